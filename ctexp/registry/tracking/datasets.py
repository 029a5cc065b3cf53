"""The activation store as an MLflow dataset input, so that MLflow shows what a run decoded.

MLflow's runs table has a Dataset column, its run page a Datasets section with a drawer (source, schema,
profile), and it groups runs by dataset: a run logs its store as one ``DatasetInput`` whose digest is
the store's content hash, so runs on the same store carry the same (name, digest) and group together.

The schema is MLflow's ``mlflow_colspec`` form (a list of ``name``/``type`` entries), the one its
dataset drawer draws as a table; each entry is one tensor of the store, its type the dtype and shape
(``float32 [600, 9, 7, 64]``). (MLflow's ``mlflow_tensorspec`` form would only show "Array Datasource".)
The profile is a flat JSON object of the store's sizes, which the drawer lists as ``key: value``.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from ctexp.records import FrozenRecord

if TYPE_CHECKING:
    import torch
    from mlflow.entities import DatasetInput

    from ctexp.data.store import Store

CONTEXT_TAG = "mlflow.data.context"  # MLflow's input tag for the role of a dataset in a run
CONTEXT = "train/val/test"  # one store feeds all three splits (by problem)
LOCAL_SOURCE = "local"  # MLflow's source type for a path on disk (the UI shows "Local" and the URI)
CODE_SOURCE = "code"  # the embedded world: built by code from its parameters, not read from disk


class StoreDataset(FrozenRecord):
    """An activation store as MLflow describes a dataset.

    Attributes:
        name: the store directory's name, or the world's spec (``world:seed=0,problems=600,...``).
        digest: the store's content hash (``StoreMeta.content_hash``).
        source_type: ``local`` (a store on disk) or ``code`` (the embedded world).
        source: JSON ``{"uri": PATH}``, or ``{"uri": WORLD_SPEC}`` for the world.
        columns_json: JSON ``{"mlflow_colspec": [{"name": TENSOR, "type": "DTYPE [SHAPE]"}, ...]}``.
        profile: JSON object of the store's sizes, model and tokenizer.
    """

    name: str
    digest: str
    source_type: str
    source: str
    columns_json: str
    profile: str

    def to_mlflow(self) -> DatasetInput:
        """This dataset as an MLflow ``DatasetInput`` (tagged with its context) for ``MlflowClient.log_inputs``."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(
            name=self.name, digest=self.digest, source_type=self.source_type, source=self.source,
            schema=self.columns_json, profile=self.profile,
        )
        return DatasetInput(dataset, tags=[InputTag(CONTEXT_TAG, CONTEXT)])


def store_dataset(store: Store) -> StoreDataset:
    """Describe ``store`` as an MLflow dataset: name, content-hash digest, source, tensor schema and profile.

    Args:
        store: a loaded (or built) activation store whose content hash is filled in.

    Returns:
        The dataset, ready for ``Tracker.start_run(dataset=...)``.
    """
    from ctexp.data.store import head_tensors  # torch: only a recorded run (which has it loaded) pays

    meta = store.meta
    if store.path is not None:
        name, source_type, uri = store.path.name, LOCAL_SOURCE, str(store.path.resolve())
    else:
        name, source_type, uri = meta.model, CODE_SOURCE, meta.model
    tensors = {"hidden": store.hidden, **head_tensors(store)}
    schema = {"mlflow_colspec": [{"name": key, "type": _tensor_type(tensor)} for key, tensor in tensors.items()]}
    schema["mlflow_colspec"].append({"name": "problems", "type": f"jsonl [{len(store.problems)}]"})
    profile = {
        "problems": meta.n_problems, "states": meta.n_states, "positions": meta.n_positions,
        "hidden": meta.hidden, "vocab": meta.vocab, "dtype": meta.dtype, "model": meta.model,
        "tokenizer": meta.tokenizer, "norm": meta.norm.kind,
    }
    return StoreDataset(
        name=name, digest=meta.content_hash, source_type=source_type, source=json.dumps({"uri": uri}),
        columns_json=json.dumps(schema), profile=json.dumps(profile),
    )


def _tensor_type(tensor: torch.Tensor) -> str:
    """``float32 [600, 9, 7, 64]``: the dtype without ``torch.`` and the shape."""
    return f"{str(tensor.dtype).removeprefix('torch.')} [{', '.join(str(size) for size in tensor.shape)}]"
