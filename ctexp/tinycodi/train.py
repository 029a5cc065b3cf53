"""The training loop: one tiny LLaMA and prj, AdamW with warmup and a final linear decay, the curriculum.

``train_model`` trains the T-latent student or, with the same architecture, data and step budget, the
0-latent model that answers directly (the baseline ``ctexp codi eval`` compares with; both:
:mod:`ctexp.tinycodi.pair`). A run is
deterministic for a seed on a given number of threads: every random draw comes from the seed (the
model's init from ``torch.manual_seed``, the problems from a ``random.Random``).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ctexp.errors import TrainingDiverged
from ctexp.model.codi import CodiModel, Projection
from ctexp.tinycodi.objective import batch_losses
from ctexp.tinycodi.settings import TinyCodiSettings
from ctexp.tinycodi.task import TaskProblem, sample_problem
from ctexp.tinycodi.vocab import BOS_ID, EOS_ID, VOCAB

N_SPECIAL = 3  # pad, bot, eot after the vocabulary, as CODI has them
BETAS = (0.9, 0.98)
LOG_EVERY = 25  # steps between the history's points


@dataclass(frozen=True)
class Progress:
    """What the progress bar shows after a step."""

    model: str  # "latent" or "direct"
    step: int
    total: int
    stage: int
    teacher: float
    student: float
    distill: float
    reembed: float = 0.0


@dataclass
class Trained:
    """A trained model, its loss history (every LOG_EVERY steps) and its training time."""

    model: CodiModel
    latents: int
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def model_config(settings: TinyCodiSettings, vocab: int) -> Any:
    """The LLaMA config of the tiny model (``vocab`` rows: V for the saved base config, V + 3 to train)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=settings.hidden,
        intermediate_size=settings.intermediate,
        num_hidden_layers=settings.layers,
        num_attention_heads=settings.heads,
        num_key_value_heads=settings.heads,
        max_position_embeddings=256,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=False,
    )


def new_model(settings: TinyCodiSettings, seed: int) -> CodiModel:
    """A freshly initialised tiny LLaMA with ``V + 3`` rows and prj, in float32 on the CPU."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    lm = LlamaForCausalLM(model_config(settings, VOCAB + N_SPECIAL))
    lm.config._attn_implementation = "sdpa"
    prj = Projection(settings.hidden, settings.hidden, layer_norm=True)
    if prj.ln is not None:
        with torch.no_grad():
            prj.ln.weight.fill_(settings.prj_gain)
    return CodiModel(lm.train(), prj.train(), VOCAB, frozenset({EOS_ID}))


def training_problems(rng: random.Random, settings: TinyCodiSettings, held: set[str]) -> list[TaskProblem]:
    """One batch: a uniform length, then a uniform problem of that length, never a held-out one."""
    batch: list[TaskProblem] = []
    while len(batch) < settings.batch_size:
        problem = sample_problem(rng, rng.choice(settings.lengths), settings.task)
        if problem.question not in held:
            batch.append(problem)
    return batch


def train_model(
    settings: TinyCodiSettings, latents: int, held: set[str], name: str,
    progress: Callable[[Progress], None] | None = None,
) -> Trained:
    """Train one model with ``latents`` latent steps (0: the direct model) under the curriculum.

    Raises:
        TrainingDiverged: A loss went non-finite.
    """
    model = new_model(settings, settings.seed)
    rng = random.Random(settings.seed)  # the same problems for both models
    parameters = [*model.lm.parameters(), *model.prj.parameters()]
    optimiser = torch.optim.AdamW(parameters, lr=settings.lr, betas=BETAS, weight_decay=settings.weight_decay)
    trained, started = Trained(model, latents), time.perf_counter()
    for step in range(settings.total_steps):
        stage = settings.stage(step)
        for group in optimiser.param_groups:
            group["lr"] = settings.learning_rate(step)
        losses = batch_losses(
            model, training_problems(rng, settings, held), settings.replaced(stage),
            settings.latents_at(stage, latents), settings.teacher_weight, settings.distill_weight, student=stage > 0,
            forcing=settings.forcing(step), isolation=settings.isolation(step), reembed_weight=settings.reembed_weight,
        )
        if not math.isfinite(float(losses.total.detach())):
            raise TrainingDiverged(f"the {name} model's loss went non-finite at step {step}; lower --lr")
        optimiser.zero_grad(set_to_none=True)
        losses.total.backward()
        torch.nn.utils.clip_grad_norm_(parameters, settings.clip)
        optimiser.step()
        if step % LOG_EVERY == 0 or step == settings.total_steps - 1:
            trained.history.append({"step": step, "stage": stage, "teacher": losses.teacher,
                                    "student": losses.student, "distill": losses.distill, "reembed": losses.reembed})
        if progress is not None:
            progress(Progress(name, step + 1, settings.total_steps, stage, losses.teacher, losses.student,
                              losses.distill, losses.reembed))
    trained.seconds = time.perf_counter() - started
    model.lm.eval().requires_grad_(False)
    model.prj.eval().requires_grad_(False)
    return trained
