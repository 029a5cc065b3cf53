"""``ctexp attention``: a store's attention file, read and summarised, and related to a lens run on that store.

``AttentionPlan`` loads what the statistics in :mod:`ctexp.analysis.attention` need (the store, its checked
attention file, the tokenizers, and with a run its test states from the registry); its ``run`` returns the
typed report. Every input is checked before anything is computed, and nothing is written here
(:mod:`ctexp.experiment.attention_record` records it; the CLI writes the figure).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ctexp.analysis.attention import (
    STATISTICS,
    AttentionReport,
    RunInfo,
    kind_masses,
    parse_layers,
    parse_positions,
    target_contrast,
    top_tokens,
)
from ctexp.analysis.comparison import RunStates
from ctexp.data.attention import load_attention
from ctexp.data.store import Store, load_store
from ctexp.data.tokenizers import load_tokenizer
from ctexp.errors import ConfigError, RegistryError
from ctexp.records import FrozenRecord
from ctexp.registry.locations import Locations
from ctexp.registry.readback import load_compared_runs
from ctexp.registry.records import RunRecord


class AttentionRequest(FrozenRecord):
    """What ``ctexp attention`` reports on."""

    store: Path
    run: str | None = None
    layers: str = "all"
    positions: str = "all"
    top: int = 5
    resamples: int = 1000
    seed: int = 0


class AttentionPlan:
    """A checked attention analysis, ready to compute: the store, its attention file, the chosen layers and
    positions, the tokenizers, and with a lens run its record and test states."""

    def __init__(self, request: AttentionRequest, locations: Locations | None = None) -> None:
        """Load and check every input; nothing is computed yet.

        Raises:
            StoreError: The store or its attention file is missing or damaged.
            ConfigError: Bad ``--layers``/``--positions``, or the run was trained on another store.
            RegistryError: The run is unknown, unfinished, or has no predictions.
            TokenizerError: The store's or the run's tokenizer cannot be loaded.
        """
        if request.top < 1 or request.resamples < 1:
            raise ConfigError("--top and --resamples must be at least 1")
        self.request = request
        self.store = load_store(request.store, check_finite=False)  # the report reads no hidden state
        self.layers = parse_layers(request.layers, self.store.meta.n_states - 1)
        self.positions = parse_positions(request.positions, self.store.meta.n_positions)
        self.lens_run: tuple[RunRecord, RunStates] | None = None
        if request.run is not None:
            self.lens_run = _finished_run(locations or Locations.resolve(), request.run, self.store)
        self.attention = load_attention(self.store)
        self.store_tokenizer = load_tokenizer(self.store.meta.tokenizer)
        self.run_tokenizer = self.store_tokenizer
        if self.lens_run is not None:
            spec = self.tokenizer_spec
            self.run_tokenizer = self.store_tokenizer if spec == self.store.meta.tokenizer else load_tokenizer(spec)

    @property
    def tokenizer_spec(self) -> str:
        """The lens run's tokenizer (the store's when there is no run, or the run names none)."""
        record = self.lens_run[0] if self.lens_run else None
        return str((record.config.get("tokenizer") if record else None) or self.store.meta.tokenizer)

    def settings(self) -> dict[str, Any]:
        """The request as recorded (parameters, ``config_json``): the store as a string, the lens run's full id."""
        return {**self.request.model_dump(mode="json"),
                "run": self.lens_run[0].id if self.lens_run else None}

    def run(self, run_id: str | None = None) -> AttentionReport:
        """Compute the report (``run_id``: the recorded run's id, if it is recorded)."""
        store, attention = self.store, self.attention
        weights = attention.head_mean()  # (P, L, T+1, C)
        report = AttentionReport(
            run_id=run_id,
            store=str(store.path),
            store_hash=store.meta.content_hash,
            mode=attention.mode.value,
            heads=attention.n_heads,
            problems=store.meta.n_problems,
            layers=self.layers,
            positions=self.positions,
            kinds=kind_masses(weights, attention.kinds, self.layers, self.positions),
            top_tokens=top_tokens(weights, attention.tokens, attention.kinds, self.layers, self.positions,
                                  self.store_tokenizer.token_str, self.request.top),
            statistics=STATISTICS,
        )
        if self.lens_run is None:
            return report
        record, states = self.lens_run
        contrast = target_contrast(
            weights, attention.tokens, attention.kinds, states, {p.id: i for i, p in enumerate(store.problems)},
            self.layers, [p for p in self.positions if isinstance(p, int)], self.store_tokenizer.token_str,
            self.run_tokenizer.token_str, self.request.resamples, self.request.seed,
        )
        info = RunInfo(id=record.id, name=record.name, lens=record.lens, target=record.target,
                       tokenizer=self.tokenizer_spec)
        return report.model_copy(update={"run": info, "target": contrast})


def attention_report(request: AttentionRequest, locations: Locations | None = None) -> AttentionReport:
    """Summarise a store's attention, and relate it to a lens run's test states if one is named (unrecorded).

    Args:
        request: The store, the optional run, and the layers, positions and statistics settings.
        locations: Where runs live (needed with ``request.run``).

    Raises:
        As ``AttentionPlan``.
    """
    return AttentionPlan(request, locations).run()


def _finished_run(locations: Locations, ref: str, store: Store) -> tuple[RunRecord, RunStates]:
    """The run ``ref`` names, if it finished on this store, with its test states."""
    with locations.registry() as registry:
        record = registry.resolve(ref)
    if record.status.value != "FINISHED":
        raise RegistryError(
            f"run {record.id[:12]} ({record.name}) is {record.status.value}; only a finished run has test predictions"
        )
    if record.store_hash != store.meta.content_hash:
        raise ConfigError(
            f"run {record.id[:12]} ({record.name}) was trained on store {record.store_hash}, not on {store.path} "
            f"({store.meta.content_hash}); pass the store the run used"
        )
    (loaded,) = load_compared_runs(locations, [record.id])
    return record, loaded.states
