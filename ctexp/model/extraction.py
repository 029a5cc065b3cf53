"""``ctexp extract``: a CODI model's continuous thoughts on a problem source, as an activation store.

Two steps, so that bad input fails before any output or disk write:

* :func:`prepare_extraction` reads the problems, finds the checkpoint, base config and tokenizer,
  checks that a partial extraction at ``OUT.partial`` (if any) is this one, and loads the model.
* :meth:`Extraction.run` thinks in batches of problems sorted by question length (longest first,
  so that a batch wastes little padding and memory peaks at once), writes shards of
  ``shard_size`` problems to ``OUT.partial/`` (see :mod:`ctexp.model.shards`), reports progress
  after every batch, and streams the finished store into place. An interrupted run, rerun with the
  same settings, resumes after its last finished shard and gives the same store.

The store: hidden ``[problems, L + 1, T + 1, d]`` in the run's dtype (position T is ``bot``),
``normed_states = [L]``, the final norm and the first V rows of the LM head, ``vocab = V``,
``tokenizer = hf:<tokenizer dir>``, ``model = <checkpoint file>``, and every problem's
``predicted`` and ``correct``. See :mod:`ctexp.model.codi` for the loop itself.

With ``attention`` set, the store also gets ``attention.safetensors``: what bot and each thought attend
to, per layer, averaged over heads or per head (:mod:`ctexp.data.attention` has the layout,
:mod:`ctexp.model.attention` the recording). The hidden states are the same as without it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, ValidationError

from ctexp.config import validation_message
from ctexp.data.attention import AttentionMode, ContextKind, attention_path
from ctexp.data.problems import Problem
from ctexp.data.sources.choices import Precision
from ctexp.data.sources.spec import PROBLEM_FILES, SourceSpec, read_problems
from ctexp.data.store import NormSpec, StoreMeta, check_out
from ctexp.errors import ConfigError
from ctexp.model.answers import answered
from ctexp.model.attention import ShardAttention, question_kinds, write_store_attention
from ctexp.model.checkpoint import ModelFiles, recorded_latents, resolve_files
from ctexp.model.codi import CodiModel, load_codi, load_hf_tokenizer, question_ids
from ctexp.model.shards import Staging, partial_path
from ctexp.records import FrozenRecord


class ExtractConfig(FrozenRecord):
    """What an extraction reads and how; the output directory and device are passed apart.

    ``batch_size`` only changes speed and padding (results agree within the dtype's tolerance); every
    other field, the problems and the checkpoint file identify an extraction, so a partial one
    resumes only under the same values.
    """

    model: Path = Field(description="CODI checkpoint directory (or the checkpoint file itself)")
    base: Path | None = Field(None, description="base model directory with config.json; default: model")
    tokenizer: Path | None = Field(None, description="tokenizer directory; default: base")
    data: str = Field(description="problem source: gsm8k:PATH, aug:PATH or hf:DIR")
    limit: int | None = Field(None, ge=1, description="only the first N problems")
    batch_size: int = Field(16, ge=1, le=4096)
    dtype: Precision = Precision.BF16
    lora_r: int = Field(128, ge=1, description="LoRA rank r (the checkpoint's must agree)")
    lora_alpha: float = Field(32.0, gt=0, description="LoRA alpha; merged scale is alpha / r")
    max_answer_tokens: int = Field(256, ge=1, description="greedy answer decoding stops after this many tokens")
    positions: int = Field(6, ge=1, le=64, description="latent steps T")
    shard_size: int = Field(256, ge=1, description="problems per shard of the partial output")
    attention: AttentionMode | None = Field(
        None, description="also record attention weights: mean (over heads) or heads (every head)"
    )


def make_config(**values: Any) -> ExtractConfig:
    """Validate extraction settings, turning the first problem into a one-line ConfigError.

    ``positions`` None (or absent) is the T the checkpoint records (``checkpoint.recorded_latents``).
    """
    if values.get("positions") is None and values.get("model") is not None:
        values["positions"] = recorded_latents(Path(values["model"]))
    try:
        return ExtractConfig(**values)
    except ValidationError as error:
        raise ConfigError(f"invalid extraction: {validation_message(error)}") from None


def torch_dtype(precision: Precision) -> torch.dtype:
    """The torch dtype of a precision choice."""
    return torch.bfloat16 if precision is Precision.BF16 else torch.float32


@dataclass(frozen=True)
class ExtractProgress:
    """Where an extraction stands; passed to the progress callback once at start and after each batch.

    Attributes:
        done: Problems finished, those resumed from an interrupted run included.
        total: Problems to extract.
        resumed: Problems taken from an earlier, interrupted run of the same extraction.
        correct: Problems of finished shards answered correctly.
        shards_done: Shards written (a shard is the unit of resumption).
        shards_total: Shards in all.
    """

    done: int
    total: int
    resumed: int
    correct: int
    shards_done: int
    shards_total: int


ProgressCallback = Callable[[ExtractProgress], None]


@dataclass(frozen=True)
class ExtractResult:
    """A finished extraction."""

    path: Path
    meta: StoreMeta
    correct: int
    resumed: int
    seconds: float
    attention: Path | None = None  # the store's attention file, when recorded


@dataclass(frozen=True)
class Extraction:
    """An extraction whose inputs are read and checked and whose model is loaded; nothing written yet."""

    config: ExtractConfig
    out: Path
    force: bool
    problems: list[Problem]
    files: ModelFiles
    tokenizer: Any
    prompts: list[list[int]]  # question ids per problem (bot not yet appended)
    order: list[int]  # processing order: longest question first
    fingerprint: str
    codi: CodiModel
    kinds: list[list[ContextKind]] | None = None  # question token kinds per problem, when attention is recorded

    def run(self, progress: ProgressCallback | None = None) -> ExtractResult:
        """Think, write shards, and assemble the store.

        Args:
            progress: Called with an ExtractProgress once at start and after every batch; an
                exception it raises stops the extraction, keeping the finished shards for a rerun.

        Returns:
            The store's path and meta, the number of correct answers, resumed problems and seconds.

        Raises:
            StoreError: The staging directory or the store cannot be written.
        """
        started = time.perf_counter()
        staging = Staging.open(partial_path(self.out), self.fingerprint, self.order, self.config.shard_size, self.force)
        resumed = staging.done
        report = _reporter(progress, staging, len(self.problems))
        report(0)
        for shard in staging.pending():
            self._run_shard(staging, shard, report)
        norm, head = self.codi.head()
        mode = self.config.attention
        finish = None if mode is None else partial(write_store_attention, staging=staging, mode=mode)
        path, sealed = staging.assemble(self.out, self._meta(norm), head, self.force, finish)
        attention = None if mode is None else attention_path(path)
        return ExtractResult(path, sealed, staging.correct, resumed, time.perf_counter() - started, attention)

    def _run_shard(self, staging: Staging, shard: int, report: Callable[[int], None]) -> None:
        """Think through one shard's batches; the shard is committed before the last batch is reported."""
        batches = list(_chunks(staging.shard_indices(shard), self.config.batch_size))
        states, finished = [], []
        mode = self.config.attention
        attention = None if mode is None else ShardAttention(mode, self.codi.bot_id, self.config.positions)
        for number, batch in enumerate(batches, start=1):
            prompts = [self.prompts[i] for i in batch]
            thoughts = self.codi.think(
                prompts, self.config.positions, self.config.max_answer_tokens, attention=attention is not None
            )
            states.append(thoughts.hidden)
            texts = [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in thoughts.answers]
            finished.extend(answered(self.problems[i], text) for i, text in zip(batch, texts, strict=True))
            if attention is not None and thoughts.attention is not None and self.kinds is not None:
                attention.add(thoughts.attention, prompts, [self.kinds[i] for i in batch])
            if number == len(batches):
                rows = None if attention is None else attention.tensors()
                staging.commit(shard, torch.cat(states), finished, rows)  # (n, S, T+1, d)
            report(len(batch))

    def _meta(self, norm: NormSpec) -> StoreMeta:
        states = self.codi.n_states
        return StoreMeta(
            model=str(self.files.checkpoint),
            n_problems=len(self.problems),
            n_states=states,
            n_positions=self.config.positions,
            hidden=self.codi.hidden,
            vocab=self.codi.vocab,
            dtype=str(torch_dtype(self.config.dtype)).removeprefix("torch."),
            tokenizer=f"hf:{self.files.tokenizer}",
            norm=norm,
            normed_states=[states - 1],
        )


def prepare_extraction(config: ExtractConfig, out: Path, device: torch.device, force: bool = False) -> Extraction:
    """Read and check every input, then load the model; nothing is written.

    Args:
        config: What to read and how.
        out: The store directory to write.
        device: Where the model runs.
        force: Replace an existing store at ``out``, and discard a partial extraction made otherwise.

    Raises:
        StoreError: ``out`` exists (without ``force``), or ``OUT.partial`` holds another extraction.
        SourceError: The problems cannot be read.
        ModelError: The checkpoint or base config is missing or does not fit.
        TokenizerError: The tokenizer cannot be loaded.
        ConfigError: The LoRA rank does not match the checkpoint's.
    """
    out = Path(out).expanduser().resolve()
    check_out(out, force)
    problems = read_problems(SourceSpec.parse(config.data, PROBLEM_FILES), config.limit)
    files = resolve_files(config.model, config.base, config.tokenizer)
    tokenizer = load_hf_tokenizer(files.tokenizer)
    prompts = [question_ids(tokenizer, problem.question) for problem in problems]
    order = sorted(range(len(problems)), key=lambda i: (-len(prompts[i]), i))
    fingerprint = _fingerprint(config, files, problems)
    Staging.check(partial_path(out), fingerprint, force)
    codi = load_codi(files, tokenizer, device, torch_dtype(config.dtype), config.lora_r, config.lora_alpha)
    kinds = None if config.attention is None else question_kinds(tokenizer, prompts)
    return Extraction(config, out, force, problems, files, tokenizer, prompts, order, fingerprint, codi, kinds)


def extract(
    config: ExtractConfig,
    out: Path,
    device: torch.device,
    progress: ProgressCallback | None = None,
    force: bool = False,
) -> ExtractResult:
    """Prepare and run an extraction (see :func:`prepare_extraction` and :meth:`Extraction.run`)."""
    return prepare_extraction(config, out, device, force).run(progress)


def _reporter(progress: ProgressCallback | None, staging: Staging, total: int) -> Callable[[int], None]:
    resumed = done = staging.done

    def report(advance: int) -> None:
        nonlocal done
        done += advance
        if progress is not None:
            progress(ExtractProgress(done, total, resumed, staging.correct, staging.shards_done, staging.n_shards))

    return report


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _fingerprint(config: ExtractConfig, files: ModelFiles, problems: list[Problem]) -> str:
    """What identifies an extraction's output: settings (batch size aside), input files and problems."""
    stat = files.checkpoint.stat()
    ignored = {"batch_size", "model", "base", "tokenizer", "data", "limit"}
    if config.attention is None:  # so that a plain extraction's fingerprint is what it was before attention
        ignored.add("attention")
    settings = config.model_dump(mode="json", exclude=ignored)
    identity = {
        "settings": settings,
        "checkpoint": [str(files.checkpoint), stat.st_size, stat.st_mtime_ns],
        "base": str(files.base),
        "tokenizer": str(files.tokenizer),
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
    for problem in problems:
        digest.update(problem.model_dump_json().encode())
    return digest.hexdigest()[:16]
