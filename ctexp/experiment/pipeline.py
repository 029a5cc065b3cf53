"""Run one experiment end to end: store -> aligned dataset -> lens -> training -> evaluation -> run dir.

``run_experiment`` is the one entry point that ``ctexp run`` (and, later, sweeps and the registry)
call; it returns a ``RunResult`` and writes the run directory atomically.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

from ctexp.analysis.evaluate import StateScores, breakdown, pick_samples, prediction_rows, prior_scores
from ctexp.analysis.result import BaselineResult, DataSummary, EpochMetrics, GroupMetrics, RunResult, StoreInfo
from ctexp.config import DeviceChoice, ExperimentConfig, LensKind
from ctexp.data.dataset import AlignedDataset, build_dataset
from ctexp.data.sources.world import build_world
from ctexp.data.store import Store, atomic_directory, load_store
from ctexp.data.tokenizers import Tokenizer, load_tokenizer
from ctexp.errors import DeviceError
from ctexp.home import default_home
from ctexp.lens.head import Head
from ctexp.lens.kinds import Lens
from ctexp.lens.train import SplitTensors, evaluate_split, train_lens
from ctexp.timings import phase


def resolve_device(choice: DeviceChoice) -> torch.device:
    """``auto`` takes CUDA when present; asking for CUDA without one is an error."""
    if choice is DeviceChoice.CUDA and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for but no CUDA device is available; use --device cpu or auto")
    if choice is DeviceChoice.CPU or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def open_store(config: ExperimentConfig) -> Store:
    """The configured store, or the embedded world built from ``config.world``."""
    if config.store is None:
        return build_world(config.world)
    return load_store(Path(config.store))


@dataclass(frozen=True)
class Prepared:
    """The inputs of a run, loaded once (a sweep worker reuses them across trials)."""

    store: Store
    tokenizer: Tokenizer


def prepare(config: ExperimentConfig) -> Prepared:
    store = open_store(config)
    return Prepared(store, load_tokenizer(config.tokenizer or store.meta.tokenizer))


@dataclass(frozen=True)
class RunPlan:
    """A run whose inputs are loaded and checked: building one is where bad input fails, before any output."""

    config: ExperimentConfig
    device: torch.device
    prepared: Prepared
    dataset: AlignedDataset


def plan_run(config: ExperimentConfig, prepared: Prepared | None = None) -> RunPlan:
    """Resolve the device, load the store and tokenizer (unless given) and build the aligned dataset."""
    device = resolve_device(config.device)
    prepared = prepared or prepare(config)
    return RunPlan(config, device, prepared, build_dataset(prepared.store, config, prepared.tokenizer))


def run_experiment(
    config: ExperimentConfig,
    home: Path | None = None,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    prepared: Prepared | None = None,
    run_id: str | None = None,
    plan: RunPlan | None = None,
) -> RunResult:
    """Train and evaluate one experiment; write its run directory under ``home/runs``.

    Args:
        config: the validated experiment.
        home: ctexp home (default ``default_home()``).
        on_epoch: called after each training epoch (progress bars, pruners).
        prepared: store and tokenizer already loaded (defaults to loading them from ``config``).
        run_id: a fixed id (default: a new random one).
        plan: the checked inputs (default: ``plan_run(config, prepared)``).
    """
    started = time.perf_counter()
    plan = plan or plan_run(config, prepared)
    device, dataset = plan.device, plan.dataset
    store, tokenizer = plan.prepared.store, plan.prepared.tokenizer
    torch.manual_seed(config.seed)
    head = Head(store, dataset.layers).to(device)
    splits = {name: _tensors(store, dataset, name, device) for name in ("train", "val", "test")}

    lens = Lens.build(
        config.lens, len(dataset.layers), store.meta.n_positions, store.meta.hidden, config.adapter,
        config.adapter_rank, config.seed,
    ).to(device)
    with phase("training"):  # validation each epoch included
        outcome = train_lens(lens, head, splits["train"], splits["val"], config.train, config.seed, on_epoch)

    with phase("evaluation"):
        test = dataset.samples["test"]
        lens_table = StateScores.from_scores(test, evaluate_split(lens, head, splits["test"]))
        identity = Lens.build(LensKind.IDENTITY, len(dataset.layers), store.meta.n_positions, store.meta.hidden)
        identity_table = StateScores.from_scores(test, evaluate_split(identity.to(device), head, splits["test"]))
        prior_table = prior_scores(dataset.samples["train"], test, store.meta.vocab, len(dataset.layers))
        seed = config.seed
        lens_bd = breakdown(lens_table, dataset.layers, dataset.positions, seed)
        baselines = {
            name: breakdown(table, dataset.layers, dataset.positions, seed)
            for name, table in (("prior", prior_table), ("identity", identity_table))
        }
    run_id = run_id or uuid.uuid4().hex
    result = RunResult(
        run_id=run_id,
        name=run_name(config, run_id),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        config=config.model_dump(mode="json"),
        config_hash=config.config_hash(),
        store=StoreInfo(
            path=str(store.path) if store.path else None,
            content_hash=store.meta.content_hash,
            model=store.meta.model,
            tokenizer=tokenizer.spec,
        ),
        device=str(device),
        seconds=0.0,
        data=_summary(dataset, store),
        lens_parameters=sum(p.numel() for p in lens.parameters()),
        epochs=outcome.epochs,
        best_epoch=outcome.best_epoch,
        stopped_early=outcome.stopped_early,
        groups={name: _rows_with_lift(rows, baselines["prior"][name], baselines["identity"][name])
                for name, rows in lens_bd.items()},
        baselines={name: BaselineResult(groups=groups) for name, groups in baselines.items()},
        samples=pick_samples(lens_table, dataset.layers, dataset.aligned, tokenizer, seed),
    )
    result = result.model_copy(update={"seconds": round(time.perf_counter() - started, 3)})
    with phase("results recording"):
        write_run_dir(result, lens, dataset, lens_table, home or default_home())
    return result


def run_name(config: ExperimentConfig, run_id: str) -> str:
    """The configured name, or ``<lens>-<target>-<id prefix>``."""
    return config.name or f"{config.lens.value}-{config.target.value}-{run_id[:6]}"


def _tensors(store: Store, dataset: AlignedDataset, split: str, device: torch.device) -> SplitTensors:
    samples = dataset.samples[split]
    return SplitTensors(
        states=dataset.states(store, split, device),
        position=samples.position.to(device),
        targets=samples.targets.to(device),
    )


def _summary(dataset: AlignedDataset, store: Store) -> DataSummary:
    splits = dataset.problem_splits
    return DataSummary(
        problems={name: len(indices) for name, indices in splits.items()},
        samples={name: len(samples) for name, samples in dataset.samples.items()},
        states={name: len(samples) * len(dataset.layers) for name, samples in dataset.samples.items()},
        layers=dataset.layers,
        positions=dataset.positions,
        empty=dataset.empty_positions,
        test_problem_ids=[store.problems[int(i)].id for i in splits.test],
    )


def _with_lift(row: GroupMetrics, prior: GroupMetrics, identity: GroupMetrics) -> GroupMetrics:
    def lift(base: float | None) -> float | None:
        return None if row.top1 is None or base is None else row.top1 - base

    return row.model_copy(
        update={
            "prior_top1": prior.top1,
            "identity_top1": identity.top1,
            "lift_prior": lift(prior.top1),
            "lift_identity": lift(identity.top1),
        }
    )


def _rows_with_lift(
    rows: list[GroupMetrics], prior_rows: list[GroupMetrics], identity_rows: list[GroupMetrics]
) -> list[GroupMetrics]:
    """The lens's rows of one grouping with the baselines' top-1 on the same groups, and the lifts over them."""
    return [_with_lift(row, p, i) for row, p, i in zip(rows, prior_rows, identity_rows, strict=True)]


def write_run_dir(
    result: RunResult, lens: Lens, dataset: AlignedDataset, table: StateScores, home: Path
) -> Path:
    """Write ``home/runs/<run_id>/`` atomically: config, metrics, predictions, lens (``Lens.load`` reads it)."""
    final = Path(home).resolve() / "runs" / result.run_id
    with atomic_directory(final, "run directory") as staging:
        (staging / "config.json").write_text(json.dumps(result.config, indent=2) + "\n", encoding="utf-8")
        (staging / "result.json").write_text(result.model_dump_json(indent=2) + "\n", encoding="utf-8")
        with (staging / "predictions.jsonl").open("w", encoding="utf-8") as handle:
            for row in prediction_rows(table, dataset.layers, dataset.aligned):
                handle.write(json.dumps(row) + "\n")
        lens.save(staging, dataset.layers, result.config)
    return final
