"""``ctexp attention``: a store's attention file, read and summarised, and related to a lens run on that store.

Loads what the statistics in :mod:`ctexp.analysis.attention` need (the store, its checked attention file,
the tokenizers, and with a run its test states from the registry) and returns the typed report. Every
input is checked before anything is computed, and nothing is written here (the CLI writes the figure).
"""

from __future__ import annotations

from pathlib import Path

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


def attention_report(request: AttentionRequest, locations: Locations | None = None) -> AttentionReport:
    """Summarise a store's attention, and relate it to a lens run's test states if one is named.

    Args:
        request: The store, the optional run, and the layers, positions and statistics settings.
        locations: Where runs live (needed with ``request.run``).

    Raises:
        StoreError: The store or its attention file is missing or damaged.
        ConfigError: Bad ``--layers``/``--positions``, or the run was trained on another store.
        RegistryError: The run is unknown, unfinished, or has no predictions.
        TokenizerError: The store's or the run's tokenizer cannot be loaded.
    """
    if request.top < 1 or request.resamples < 1:
        raise ConfigError("--top and --resamples must be at least 1")
    store = load_store(request.store, check_finite=False)  # the report reads no hidden state
    layers = parse_layers(request.layers, store.meta.n_states - 1)
    positions = parse_positions(request.positions, store.meta.n_positions)
    run = None
    if request.run is not None:
        run = _finished_run(locations or Locations.resolve(), request.run, store)
    attention = load_attention(store)
    weights = attention.head_mean()  # (P, L, T+1, C)
    store_tokenizer = load_tokenizer(store.meta.tokenizer)
    report = AttentionReport(
        store=str(store.path),
        store_hash=store.meta.content_hash,
        mode=attention.mode.value,
        heads=attention.n_heads,
        problems=store.meta.n_problems,
        layers=layers,
        positions=positions,
        kinds=kind_masses(weights, attention.kinds, layers, positions),
        top_tokens=top_tokens(weights, attention.tokens, attention.kinds, layers, positions,
                              store_tokenizer.token_str, request.top),
        statistics=STATISTICS,
    )
    if run is None:
        return report
    record, states = run
    spec = str(record.config.get("tokenizer") or store.meta.tokenizer)
    run_tokenizer = store_tokenizer if spec == store.meta.tokenizer else load_tokenizer(spec)
    contrast = target_contrast(
        weights, attention.tokens, attention.kinds, states, {p.id: i for i, p in enumerate(store.problems)},
        layers, [p for p in positions if isinstance(p, int)], store_tokenizer.token_str, run_tokenizer.token_str,
        request.resamples, request.seed,
    )
    info = RunInfo(id=record.id, name=record.name, lens=record.lens, target=record.target, tokenizer=spec)
    return report.model_copy(update={"run": info, "target": contrast})


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
