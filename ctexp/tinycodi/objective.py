"""The CODI objective on a batch of generated problems, with a Coconut-style curriculum.

Sequences (ids; ``bot`` and ``eot`` are CODI's special ids, after the vocabulary):

* teacher: ``<s> question bot eot`` + every CoT step + the answer + ``</s>``; cross-entropy on what
  follows ``eot``. This is the student of stage 0: explicit CoT.
* student in a stage that replaces ``r`` steps with ``n`` latents: ``<s> question bot``, ``n`` latent
  steps through prj (CODI's own loop, ``CodiModel.latents``), then ``eot`` + the remaining steps + the
  answer + ``</s>``; cross-entropy on what follows ``eot``. With every step replaced it answers at once.
* latent forcing (optional, a curriculum of ours): the thought fed back after latent ``p`` is mixed with
  the input embedding of the value its step computes, ``(1 - a) z + a e`` (``e`` rescaled to ``z``'s norm),
  with ``a`` falling to 0 by the last stage: a start for the path that carries a value from one latent
  pass to the next, which plain CODI did not learn at this size (README has what forcing measured: it
  learned the path while forced, and lost it as the weight fell). Evaluation and extraction never force.
* thought isolation (optional, ours): in a fraction of the batch, falling to 0 by the last stage, each
  latent step attends only to the question, bot and itself, and ``eot`` onwards only to the last
  thought, so a value can reach the answer only through the fed-back thoughts (``CodiModel.latents``);
  plain CODI also lets a thought read the earlier thoughts' states by attention. Evaluation and
  extraction never isolate.
* re-embedding (optional, ours): prj learns, on the teacher's own pass, to map the last hidden state at
  bot and at every CoT position to the input embedding of the token that follows (1 - cosine, plus the
  squared log of their norms' ratio), so a latent loop whose thoughts stand one for one for CoT tokens
  starts as a soft copy of the teacher's greedy CoT. Without it prj learns only through the answer, and at
  this size a value never passed from one latent to the next through it (README, ``ctexp codi``).
* distillation (optional, as in CODI): L1 between the student's and the (detached) teacher's hidden
  states at the token that predicts the answer's first token, every layer, each scaled by the teacher
  layer's standard deviation.
"""

from __future__ import annotations

import contextlib
import itertools
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional

from ctexp.model.codi import CodiModel
from ctexp.tinycodi.task import TaskProblem
from ctexp.tinycodi.vocab import EOS_ID, encode, question_ids

IGNORE = -100


@dataclass(frozen=True)
class Losses:
    """One batch's losses; ``total`` is what the optimiser steps on."""

    total: torch.Tensor
    teacher: float
    student: float
    distill: float
    reembed: float = 0.0


def continuation(problem: TaskProblem, replaced: int) -> list[int]:
    """What follows ``eot`` once the first ``replaced`` steps are latents: the other steps, the answer, EOS."""
    return [*encode(" ".join([*problem.steps[replaced:], problem.answer])), EOS_ID]


@dataclass(frozen=True)
class ValueForcing:
    """A ``ThoughtPatch`` that mixes each fed-back thought with its step's value embedding.

    ``values[p]`` (B, 1, d) is the value embedding after latent ``p``, or None where latent ``p`` ends no step.
    """

    values: list[torch.Tensor | None]
    weight: float

    def feedback(self, position: int, z: torch.Tensor) -> torch.Tensor:
        value = self.values[position]  # (B, 1, d)
        if value is None:
            return z
        scaled = value * (z.detach().norm(dim=-1, keepdim=True) / value.norm(dim=-1, keepdim=True).clamp(min=1e-6))
        return (1 - self.weight) * z + self.weight * scaled

    def during(self, lm: Any, position: int) -> AbstractContextManager[None]:
        return contextlib.nullcontext()  # forcing touches only the fed-back thoughts


def value_forcing(
    model: CodiModel, problems: list[TaskProblem], replaced: int, latents: int, weight: float,
) -> ValueForcing | None:
    """The forcing of a stage whose ``latents`` thoughts stand for the first ``replaced`` steps (None at weight 0).

    The thoughts share the steps evenly: latent ``p`` ends step ``s`` when ``s + 1 == (p + 1) * replaced //
    latents`` rises at ``p`` (every latent when they are as many; every second one with twice as many), and
    only a thought that ends a step is forced; past a problem's last step, to its last value. A value's
    embedding is the mean of its token embeddings (one digit in the tasks here), detached: a target, not a
    parameter path.
    """
    if weight <= 0 or latents < 2:
        return None
    table = model.lm.get_input_embeddings().weight.detach()  # (V + 3, d)
    values: list[torch.Tensor | None] = []
    for p in range(latents - 1):  # the last thought's projection is never fed back (eot follows)
        done = (p + 1) * replaced // latents
        if done == p * replaced // latents:
            values.append(None)
            continue
        ids = [encode(problem.results[min(done, problem.n_steps) - 1]) for problem in problems]
        flat = torch.tensor([i for row in ids for i in row], device=table.device)
        offsets = torch.tensor([0, *itertools.accumulate(len(row) for row in ids[:-1])], device=table.device)
        values.append(functional.embedding_bag(flat, table, offsets, mode="mean").unsqueeze(1))  # (B, 1, d)
    return ValueForcing(values, weight)


def _right_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (B, m)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, m)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def _labels(ids: torch.Tensor, mask: torch.Tensor, scored_from: list[int]) -> torch.Tensor:
    """Next-token labels: ids shifted left, IGNORE before each row's ``scored_from`` and on padding."""
    labels = ids.masked_fill(mask == 0, IGNORE)[:, 1:].clone()  # (B, m-1)
    for i, start in enumerate(scored_from):
        labels[i, : start - 1] = IGNORE
    return labels


def _answer_index(suffix: list[int], problem: TaskProblem) -> int:
    """Index in ``suffix`` (eot first) of the token whose next token is the answer's first."""
    return len(suffix) - 2 - len(encode(problem.answer))  # suffix ends: (" " or eot), answer digits, EOS


@dataclass(frozen=True)
class TeacherPass:
    """The teacher's CE, its hidden states at the answer-predicting token (S, B, d), and the re-embedding loss."""

    loss: torch.Tensor
    states: torch.Tensor
    reembedding: torch.Tensor | None


def teacher_loss(model: CodiModel, problems: list[TaskProblem], reembed: bool = False) -> TeacherPass:
    """The teacher's pass over explicit CoT; with ``reembed`` also prj's re-embedding loss on it."""
    prefixes = [[*question_ids(p.question), model.bot_id, model.eot_id] for p in problems]
    rows = [[*prefix, *continuation(p, 0)] for prefix, p in zip(prefixes, problems, strict=True)]
    ids, mask = _right_pad(rows, model.pad_id)  # (B, m)
    out = model.lm(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    labels = _labels(ids, mask, [len(prefix) for prefix in prefixes])  # (B, m-1)
    loss = functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
    at = [len(prefix) - 1 + _answer_index([model.eot_id, *continuation(p, 0)], p)
          for prefix, p in zip(prefixes, problems, strict=True)]
    rows_index = torch.arange(len(problems))
    states = torch.stack([h[rows_index, at] for h in out.hidden_states])  # (S, B, d)
    following = None
    if reembed:
        following = labels.clone()  # (B, m-1): the token after each scored position...
        following[rows_index, torch.tensor([len(prefix) - 2 for prefix in prefixes])] = model.eot_id  # ...and bot's
    return TeacherPass(loss, states, None if following is None else reembedding(model, out.hidden_states[-1], following))


def reembedding(model: CodiModel, last: torch.Tensor, following: torch.Tensor) -> torch.Tensor:
    """How far ``prj(h_t)`` is from the input embedding of the token after ``t``, where ``following`` is not IGNORE.

    ``last`` (B, m, d) is the last hidden state and ``following`` (B, m-1) the next token of each position. The
    loss is ``1 - cosine`` plus the squared log of the norms' ratio: direction and scale, neither dominating
    (a plain squared error is ruled by the scale while prj's LayerNorm gain is far from the embeddings').
    The embeddings are detached: targets for prj, not something to pull towards prj's outputs.
    """
    keep = following != IGNORE  # (B, m-1)
    z = model.prj(last[:, :-1][keep])  # (K, d)
    target = model.lm.get_input_embeddings().weight.detach()[following[keep]]  # (K, d)
    direction = 1 - functional.cosine_similarity(z, target, dim=-1)
    scale = (z.norm(dim=-1).clamp(min=1e-6) / target.norm(dim=-1).clamp(min=1e-6)).log().square()
    return (direction + scale).mean()


def student_loss(
    model: CodiModel, problems: list[TaskProblem], replaced: int, latents: int, with_states: bool,
    forcing: float = 0.0, isolation: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Student CE after ``latents`` latent steps that stand for the first ``replaced`` CoT steps.

    Args:
        forcing: Weight of each step's value in the thoughts fed back (``value_forcing``); 0 is plain CODI.
        isolation: Fraction of the problems (the batch's first rows) whose thoughts are isolated
            (``CodiModel.latents``); 0 is plain CODI.

    Returns:
        The CE, and with ``with_states`` the student's hidden states at the answer-predicting token (S, B, d).
    """
    patch = value_forcing(model, problems, replaced, latents, forcing)
    isolated = torch.arange(len(problems)) < round(isolation * len(problems))  # (B,)
    loop = model.latents([question_ids(p.question) for p in problems], latents, patch,
                         isolated if bool(isolated.any()) else None)
    suffixes = [[model.eot_id, *continuation(p, replaced)] for p in problems]
    ids, mask = _right_pad(suffixes, model.pad_id)  # (B, m)
    out = model.feed(model.lm.get_input_embeddings()(ids), loop, hidden=with_states)
    labels = _labels(ids, mask, [1] * len(problems))  # (B, m-1): everything after eot
    loss = functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
    if not with_states:
        return loss, None
    at = [_answer_index(suffix, p) for suffix, p in zip(suffixes, problems, strict=True)]
    rows_index = torch.arange(len(problems))
    return loss, torch.stack([h[rows_index, at] for h in out.hidden_states])  # (S, B, d)


def distillation(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """CODI's L1 between student and detached teacher states (S, B, d), each layer scaled by the teacher's std."""
    teacher = teacher.detach()
    scale = teacher.std(dim=(1, 2), keepdim=True).clamp(min=1e-6)  # (S, 1, 1)
    return ((student - teacher).abs() / scale).mean()


def batch_losses(
    model: CodiModel, problems: list[TaskProblem], replaced: int, latents: int, teacher_weight: float,
    distill_weight: float, student: bool, forcing: float = 0.0, isolation: float = 0.0, reembed_weight: float = 0.0,
) -> Losses:
    """The step's losses: teacher CE and re-embedding, and (after the teacher-only steps) student CE and distillation."""
    teacher_pass = teacher_loss(model, problems, reembed=reembed_weight > 0)
    teacher, teacher_states = teacher_pass.loss, teacher_pass.states
    total = teacher_weight * teacher
    reembed_value = 0.0
    if teacher_pass.reembedding is not None:
        total = total + reembed_weight * teacher_pass.reembedding
        reembed_value = float(teacher_pass.reembedding.detach())
    student_value = distill_value = 0.0
    if student:
        wants_states = distill_weight > 0
        loss, states = student_loss(model, problems, replaced, latents, wants_states, forcing, isolation)
        total = total + loss
        student_value = float(loss.detach())
        if states is not None:
            distill = distillation(states, teacher_states)
            total = total + distill_weight * distill
            distill_value = float(distill.detach())
    return Losses(total, float(teacher.detach()), student_value, distill_value, reembed_value)
