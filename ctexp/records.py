"""The pydantic bases of ctexp's typed records.

Unknown fields are errors everywhere: a misspelt key in a manifest, a meta.json or a result must fail
loudly rather than be dropped. ``FrozenRecord`` is for values that are facts once made (a run row, a
search parameter, a worker's identity) and must not change after validation.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Record(BaseModel):
    """A typed record that rejects unknown fields."""

    model_config = ConfigDict(extra="forbid", defer_build=True)


class FrozenRecord(BaseModel):
    """A typed record that rejects unknown fields and cannot be changed after validation."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)
