"""``ctexp intervene``: replace one continuous thought of a CODI model and see how its answers change.

Two steps, so that bad input fails before any output:

* :func:`plan_intervention` resolves the lens run in the registry, reads its run directory
  (``result.json``; the saved lens for ``decoded``), opens its store, checks that the store was
  extracted from ``--model``, resolves positions, modes and problems, chooses the tokens that
  ``decoded`` and ``target`` feed, and loads the model.
* :meth:`InterventionPlan.run` runs the control (CODI unmodified, recording the site's values that
  ``none``, ``mean``, ``swap`` and ``noise`` need), then one pass per (position, mode) row and one per
  mode with every position replaced at once (position ``"all"``), and compares each with the
  control (:mod:`ctexp.analysis.intervention`).

The model-level machinery (sites, modes, batching) is :mod:`ctexp.model.intervene`; recording an
intervention in the registry and MLflow is :mod:`ctexp.experiment.intervene_record`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, ValidationError

from ctexp.analysis.intervention import (
    ALPHA,
    RESAMPLES,
    InterventionResult,
    ProblemAnswer,
    adjust,
    paired_row,
    summarize_control,
)
from ctexp.analysis.result import RunResult
from ctexp.config import ExperimentConfig, parse_index_spec, validation_message
from ctexp.data.dataset import build_dataset
from ctexp.data.problems import Problem
from ctexp.data.sources.choices import Precision
from ctexp.data.store import Store, load_store
from ctexp.data.tokenizers import load_tokenizer
from ctexp.errors import ConfigError, ModelError, RegistryError, StoreError
from ctexp.lens.head import Head
from ctexp.lens.kinds import Lens
from ctexp.model.answers import answered, parse_answer
from ctexp.model.checkpoint import resolve_files
from ctexp.model.codi import load_codi, load_hf_tokenizer, question_ids
from ctexp.model.extraction import torch_dtype
from ctexp.model.intervene import (
    NO_TOKEN,
    TOKEN_MODES,
    ControlPass,
    Intervener,
    Mode,
    Site,
    derangement,
    replacement,
    site_positions,
)
from ctexp.records import FrozenRecord
from ctexp.registry.locations import Locations
from ctexp.registry.records import RunRecord

DEFAULT_MODES = (Mode.DECODED, Mode.TARGET, Mode.MEAN, Mode.ZERO, Mode.SWAP, Mode.NOISE)
LENS_CHUNK = 64  # problems decoded at once: bounds the (chunk, layers, vocab) logits


class ProblemSet(StrEnum):
    """Which of the store's problems: the lens run's test problems, or all."""

    TEST = "test"
    ALL = "all"


class InterveneConfig(FrozenRecord):
    """What ``ctexp intervene`` does; the device is passed apart."""

    run: str = Field(description="the lens run: id, unique id prefix, name, MLflow run id or latest")
    model: Path = Field(description="CODI checkpoint directory (or file) the run's store was extracted from")
    base: Path | None = Field(None, description="base model directory with config.json; default: model")
    tokenizer: Path | None = Field(None, description="tokenizer directory; default: base")
    positions: str | None = Field(None, description="store positions: 0-4, 1,3; default: every one the site takes")
    modes: tuple[Mode, ...] = Field(DEFAULT_MODES, min_length=1)
    site: Site = Site.FEEDBACK
    layer: int | None = Field(None, ge=0, description="hidden-state index of the residual site")
    lens_layer: int | None = Field(None, ge=0, description="layer the lens decodes for decoded; default: best at p")
    problems: ProblemSet = ProblemSet.TEST
    limit: int | None = Field(None, ge=1, description="only the first N problems")
    batch_size: int = Field(16, ge=1, le=4096)
    dtype: Precision = Precision.BF16
    lora_r: int = Field(128, ge=1)
    lora_alpha: float = Field(32.0, gt=0)
    max_answer_tokens: int = Field(256, ge=1)
    seed: int = 0
    name: str | None = None
    resamples: int = Field(RESAMPLES, ge=100)
    alpha: float = Field(ALPHA, gt=0, lt=1)


def make_intervene_config(**values: Any) -> InterveneConfig:
    """Validate the settings, turning the first problem into a one-line ConfigError."""
    try:
        return InterveneConfig(**values)
    except ValidationError as error:
        raise ConfigError(f"invalid intervention: {validation_message(error)}") from None


def parse_modes(text: str) -> tuple[Mode, ...]:
    """``decoded,mean`` -> the modes, in the order given (duplicates once).

    Raises:
        ConfigError: an unknown or empty mode.
    """
    names = [name.strip() for name in text.split(",")]
    known = ", ".join(mode.value for mode in Mode)
    for name in names:
        if name not in {mode.value for mode in Mode}:
            raise ConfigError(f"--mode: unknown mode {name!r}; use a comma list of {known}")
    return tuple(dict.fromkeys(Mode(name) for name in names))


@dataclass(frozen=True)
class InterveneProgress:
    """Where an intervention stands: problems done over all passes, and the pass running."""

    done: int
    total: int
    label: str


RowKey = tuple[int | Literal["all"], Mode]


@dataclass(frozen=True)
class InterventionPlan:
    """An intervention whose inputs are read and checked and whose model is loaded."""

    config: InterveneConfig
    lens_run: RunRecord
    store: Store
    indices: list[int]  # store problem indices, in the order answers are reported
    positions: list[int]
    lens_layers: dict[int, int]  # position -> lens layer (decoded only)
    tokens: dict[Mode, dict[int, torch.Tensor]]  # token mode -> position -> (n,) ids, NO_TOKEN where none
    intervener: Intervener
    hf_tokenizer: Any
    device: torch.device

    def rows(self) -> list[RowKey]:
        """Mode by mode: each position, then all of them at once (when there are several)."""
        every: list[int | Literal["all"]] = [*self.positions, *(["all"] if len(self.positions) > 1 else [])]
        return [(position, mode) for mode in self.config.modes for position in every]

    def run(
        self, progress: Callable[[InterveneProgress], None] | None = None, run_id: str | None = None
    ) -> InterventionResult:
        """Run the control and every row's pass, and compare each row with the control.

        ``run_id`` names the result (default: a new random id), so that a recorded run can be started first.
        """
        config, n = self.config, len(self.indices)
        rows = self.rows()
        done, total = 0, (1 + len(rows)) * n

        def step(label: str) -> Callable[[int], None]:
            def advance(count: int) -> None:
                nonlocal done
                done += count
                if progress is not None:
                    progress(InterveneProgress(done, total, label))

            return advance

        if progress is not None:
            progress(InterveneProgress(0, total, "control"))
        control = self.intervener.control(config.site, config.layer, step("control"))
        control_answers = self._answers(control.answers)
        permutation = derangement(n, config.seed) if n >= 2 else list(range(n))
        results = []
        for number, (position, mode) in enumerate(rows):
            replaced = [*self.positions] if position == "all" else [position]
            values = {p: self._values(mode, p, control, permutation) for p in replaced}
            ids = self.intervener.replaced(config.site, config.layer, values, step(f"{mode.value} at {position}"))
            answers, keep = self._answers(ids), self._included(mode, replaced)
            results.append(paired_row(
                [control_answers[i] for i in keep], [answers[i] for i in keep],
                position=position, mode=mode.value, site=config.site.value,
                layer=config.layer if config.site is Site.RESIDUAL else None,
                seed=(config.seed, number), resamples=config.resamples, alpha=config.alpha,
            ))
        return InterventionResult(
            run_id=run_id or uuid.uuid4().hex,
            lens_run=self.lens_run.id,
            config=self.resolved_config(),
            control=summarize_control(control_answers),
            rows=adjust(results, config.alpha),
        )

    def _values(self, mode: Mode, position: int, control: ControlPass, permutation: list[int]) -> torch.Tensor:
        column = site_positions(self.config.site, self.store.meta.n_positions).index(position)
        seed = np.random.SeedSequence([self.config.seed, position]).generate_state(1)[0]
        return replacement(
            mode,
            control.recorded[:, column],  # (n, d)
            tokens=self.tokens.get(mode, {}).get(position),
            embedding=self.intervener.codi.lm.get_input_embeddings().weight,
            permutation=permutation,
            generator=torch.Generator().manual_seed(int(seed)),
        )

    def _included(self, mode: Mode, positions: list[int]) -> list[int]:
        """Problems the row compares: those with a token at every replaced position (token modes), else all."""
        if mode not in TOKEN_MODES:
            return list(range(len(self.indices)))
        has = torch.stack([self.tokens[mode][p] != NO_TOKEN for p in positions]).all(0)  # (n,)
        return has.nonzero().flatten().tolist()

    def _answers(self, ids: list[list[int]]) -> list[ProblemAnswer]:
        answers = []
        for index, tokens in zip(self.indices, ids, strict=True):
            problem: Problem = self.store.problems[index]
            text = self.hf_tokenizer.decode(tokens, skip_special_tokens=True)
            answers.append(ProblemAnswer(
                problem_id=problem.id, text=text, parsed=parse_answer(text), correct=bool(answered(problem, text).correct),
            ))
        return answers

    def resolved_config(self) -> dict[str, Any]:
        """The settings as run: the lens run's id for ``run``, the positions, lens layers, store and device."""
        return {
            **self.config.model_dump(mode="json"),
            "run": self.lens_run.id,
            "positions": self.positions,
            "lens_layers": {str(p): layer for p, layer in self.lens_layers.items()} or None,
            "store": str(self.store.path) if self.store.path else None,
            "device": str(self.device),
            "n_problems": len(self.indices),
        }


# --- planning: every check before the model runs ---------------------------------------------------


def plan_intervention(config: InterveneConfig, locations: Locations, device: torch.device) -> InterventionPlan:
    """Read and check every input, then load the model; nothing is written.

    Raises:
        RegistryError: the run is unknown, not finished, or its run directory is missing.
        StoreError: the run's store is missing or changed since the run.
        ModelError: the checkpoint is missing, does not load, or is not the store's model.
        ConfigError: bad positions, modes, layers or problem counts.
    """
    run, result, run_dir = _lens_run(config.run, locations)
    store = _run_store(run, result)
    files = resolve_files(config.model, config.base, config.tokenizer)
    if Path(store.meta.model).resolve() != files.checkpoint:
        raise ModelError(
            f"the store of run {run.id[:12]} ({store.path}) was extracted from {store.meta.model}, not "
            f"{files.checkpoint}; pass the --model that store was extracted from"
        )
    positions = _positions(config, store.meta.n_positions, store.meta.n_states)
    indices = _problem_indices(config, result, store)
    if len(indices) < 2 and {Mode.MEAN, Mode.SWAP} & set(config.modes):
        raise ConfigError(f"modes mean and swap need at least 2 problems, and {len(indices)} are selected")
    tokens: dict[Mode, dict[int, torch.Tensor]] = {}
    lens_layers: dict[int, int] = {}
    if Mode.TARGET in config.modes:
        tokens[Mode.TARGET] = _target_tokens(result, store, indices, positions)
    if Mode.DECODED in config.modes:
        lens_layers = {p: _lens_layer(config.lens_layer, result, p) for p in positions}
        tokens[Mode.DECODED] = _decoded_tokens(run_dir, store, indices, lens_layers)
    hf_tokenizer = load_hf_tokenizer(files.tokenizer)
    codi = load_codi(files, hf_tokenizer, device, torch_dtype(config.dtype), config.lora_r, config.lora_alpha)
    if codi.n_states != store.meta.n_states or codi.hidden != store.meta.hidden:
        raise ModelError(
            f"{files.checkpoint} has {codi.n_states} states of size {codi.hidden}, but the store has "
            f"{store.meta.n_states} of size {store.meta.hidden}; pass the model the store was extracted from"
        )
    prompts = [question_ids(hf_tokenizer, store.problems[i].question) for i in indices]
    intervener = Intervener(codi, prompts, store.meta.n_positions, config.max_answer_tokens, config.batch_size)
    return InterventionPlan(
        config, run, store, indices, positions, lens_layers, tokens, intervener, hf_tokenizer, device
    )


def _lens_run(ref: str, locations: Locations) -> tuple[RunRecord, RunResult, Path]:
    with locations.registry() as registry:
        run = registry.resolve(ref)
    if run.kind.value != "lens":
        raise RegistryError(f"run {run.id[:12]} ({run.name}) is an {run.kind.value}; intervene needs a finished lens run")
    if run.status.value != "FINISHED":
        raise RegistryError(f"run {run.id[:12]} ({run.name}) is {run.status.value}; intervene needs a finished lens run")
    run_dir = locations.home / "runs" / run.id
    path = run_dir / "result.json"
    if not path.is_file():
        raise RegistryError(f"run {run.id[:12]} ({run.name}) has no run directory with result.json at {run_dir}")
    try:
        return run, RunResult.model_validate_json(path.read_text(encoding="utf-8")), run_dir
    except (OSError, ValidationError) as error:
        raise RegistryError(f"{path} cannot be read as a run result ({str(error).splitlines()[0]})") from None


def _run_store(run: RunRecord, result: RunResult) -> Store:
    if result.store.path is None:
        raise ConfigError(
            f"run {run.id[:12]} ({run.name}) was trained on the embedded world; intervene needs a run on a "
            "store extracted from a CODI checkpoint (ctexp extract, then ctexp run --store)"
        )
    store = load_store(Path(result.store.path))
    if store.meta.content_hash != result.store.content_hash:
        raise StoreError(
            f"the store at {result.store.path} changed since run {run.id[:12]} (hash {store.meta.content_hash}, "
            f"the run read {result.store.content_hash}); rerun the lens on it"
        )
    return store


def _positions(config: InterveneConfig, n_positions: int, n_states: int) -> list[int]:
    if config.site is Site.FEEDBACK and config.layer is not None:
        raise ConfigError("--layer is for --site residual; the feedback site is the projection prj(h)")
    if config.site is Site.RESIDUAL:
        if config.layer is None or config.layer >= n_states:
            raise ConfigError(f"--site residual needs --layer L with 0 <= L < {n_states} (the store's hidden states)")
        if TOKEN_MODES & set(config.modes):
            raise ConfigError(
                "modes decoded and target feed a token's embedding in place of the feedback; "
                "use --site feedback, or other modes at the residual site"
            )
    allowed = site_positions(config.site, n_positions)
    if config.positions is None:
        return allowed
    try:
        positions = parse_index_spec(config.positions, n_positions)
    except ValueError as error:
        raise ConfigError(f"--positions: {error}") from None
    assert positions is not None
    last = n_positions - 1
    if config.site is Site.FEEDBACK and last in positions:
        raise ConfigError(
            f"position {last} is the last: after it CODI feeds eot, so its projection is never used; "
            f"use --site residual --layer L to replace it"
        )
    return positions


def _problem_indices(config: InterveneConfig, result: RunResult, store: Store) -> list[int]:
    if config.problems is ProblemSet.ALL:
        indices = list(range(len(store.problems)))
    else:
        where = {problem.id: index for index, problem in enumerate(store.problems)}
        missing = [pid for pid in result.data.test_problem_ids if pid not in where]
        if missing:
            raise StoreError(f"test problem {missing[0]!r} of the run is not in the store {store.path}")
        indices = [where[pid] for pid in result.data.test_problem_ids]
    return indices[: config.limit] if config.limit is not None else indices


def _target_tokens(result: RunResult, store: Store, indices: list[int], positions: list[int]) -> dict[int, torch.Tensor]:
    """The first aligned CoT target of each problem at each position, as the run aligned it."""
    experiment = ExperimentConfig.model_validate(result.config)
    dataset = build_dataset(store, experiment, load_tokenizer(experiment.tokenizer or store.meta.tokenizer))
    return {
        p: torch.tensor([
            (dataset.aligned[i].positions[p].target_ids or [NO_TOKEN])[0] for i in indices
        ], dtype=torch.long)
        for p in positions
    }


def _lens_layer(chosen: int | None, result: RunResult, position: int) -> int:
    """``--lens-layer``, else the run's best layer at the position by test top-1 (the lower on a tie)."""
    if chosen is not None:
        if chosen not in result.data.layers:
            raise ConfigError(f"--lens-layer {chosen} is not a layer of the run's lens ({result.data.layers})")
        return chosen
    cells = [c for c in result.rows("cell") if c.position == position and c.top1 is not None and c.layer is not None]
    if not cells:
        raise ConfigError(f"the run has no test results at position {position}; pass --lens-layer L")
    best = max(cells, key=lambda cell: (cell.top1, -cell.layer))  # type: ignore[operator]
    assert best.layer is not None
    return best.layer


def _decoded_tokens(run_dir: Path, store: Store, indices: list[int], lens_layers: dict[int, int]) -> dict[int, torch.Tensor]:
    """The lens's top-1 token of each problem's stored state at each position, at that position's lens layer."""
    lens, spec = Lens.load(run_dir)
    layers = spec.layers
    head = Head(store, layers)
    rows = torch.tensor(indices)
    tokens = {}
    with torch.no_grad():
        for position, layer in lens_layers.items():
            column = layers.index(layer)
            found = []
            for chunk in rows.split(LENS_CHUNK):
                states = store.hidden[chunk][:, layers, position].float()  # (c, L, d)
                translated = lens(states, torch.full((len(chunk),), position, dtype=torch.long))  # (c, L, d)
                found.append(head(translated)[:, column].argmax(-1))  # (c,)
            tokens[position] = torch.cat(found)
    return tokens
