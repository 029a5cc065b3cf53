"""Interventions on CODI's thoughts: rerun the latent loop and the answer with one thought replaced.

Store position ``p`` is the state latent step ``p`` produces (the state a lens decodes). Two sites:

* ``feedback``: the vector CODI feeds back after position ``p``, ``z_p = prj(h_p)``, the input of
  latent step ``p + 1``. After the last step CODI feeds ``eot``, so the last position's projection is
  never used and this site covers positions ``0..T-2``.
* ``residual`` at layer ``L``: ``hidden_states[L]`` (0 = embedding output, the last = after the final
  norm, as the store records them) at position ``p``, replaced by a forward hook while step ``p`` runs.
  It reaches the answer through the attention cache of the later steps as well as through the
  feedback, and covers every position.

Modes (what replaces the site's value ``v_i`` of problem ``i``): ``none`` (``v_i`` itself, as the
control pass recorded it: a check of the machinery), ``zero``, ``mean`` (the mean of ``v_j`` over the
other problems ``j``), ``swap`` (``v_{pi(i)}`` for a seeded derangement ``pi``), ``noise`` (Gaussian
with the norm of ``v_i``), and for the feedback site ``decoded`` and ``target`` (the input embedding of
a token: the lens's top-1, or the aligned CoT target; the tokens are chosen above this layer).

``Intervener`` runs the passes in fixed batches (problems sorted by question length, longest first,
as extraction does), so that every pass batches a problem with the same neighbours: the ``none`` pass
reproduces the control's answers bit for bit, and a batch gives the same answers as one problem at a
time up to the dtype's rounding (masked, left-padded batches, as ``CodiModel.think`` runs them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
import torch
from torch import nn

from ctexp.errors import ModelError
from ctexp.model.codi import CodiModel, ThoughtPatch, final_norm


class Site(StrEnum):
    """Where a thought is replaced."""

    FEEDBACK = "feedback"
    RESIDUAL = "residual"


class Mode(StrEnum):
    """What replaces it."""

    NONE = "none"
    DECODED = "decoded"
    TARGET = "target"
    MEAN = "mean"
    ZERO = "zero"
    SWAP = "swap"
    NOISE = "noise"


TOKEN_MODES = frozenset({Mode.DECODED, Mode.TARGET})  # feed a token's input embedding: feedback only
NO_TOKEN = -1  # a problem without a token at a position (an empty CoT slice): it keeps its own value


def site_positions(site: Site, n_positions: int) -> list[int]:
    """The store positions a site applies to: feedback stops before the last (its projection is unused)."""
    return list(range(n_positions - 1 if site is Site.FEEDBACK else n_positions))


# --- patching one forward pass --------------------------------------------------------------------


Apply = Callable[[int, torch.Tensor], torch.Tensor]  # (position, value (B, 1, d)) -> value (B, 1, d)


@dataclass(frozen=True)
class SitePatch:
    """A ``ThoughtPatch`` that passes the site's value at ``positions`` through ``apply``.

    ``apply`` may record the value and return it (the control pass) or return a replacement.
    """

    site: Site
    layer: int | None  # residual only
    positions: frozenset[int]
    apply: Apply

    def feedback(self, position: int, z: torch.Tensor) -> torch.Tensor:
        if self.site is Site.FEEDBACK and position in self.positions:
            return self.apply(position, z)
        return z

    @contextmanager
    def during(self, lm: Any, position: int) -> Iterator[None]:
        if self.site is not Site.RESIDUAL or position not in self.positions:
            yield
            return
        assert self.layer is not None
        handle = _hook_hidden_state(lm, self.layer, lambda value: self.apply(position, value))
        try:
            yield
        finally:
            handle.remove()


def _hook_hidden_state(lm: Any, layer: int, replace: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Hook ``replace`` onto ``hidden_states[layer]`` of ``lm``; returns the handle to remove.

    ``hidden_states[0]`` is the input of block 0, ``hidden_states[L]`` for ``0 < L < n`` the output
    of block ``L - 1``, and ``hidden_states[n]`` the output of the final norm. Output hooks go first
    (``prepend``), so that the hidden states transformers records are the replaced ones too.
    """
    blocks = decoder_layers(lm)
    if layer == 0:

        def before(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if args:
                return (replace(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": replace(kwargs["hidden_states"])}

        return blocks[0].register_forward_pre_hook(before, with_kwargs=True)
    module = blocks[layer - 1] if layer < len(blocks) else final_norm(lm)

    def after(module: nn.Module, args: tuple, output: Any) -> Any:
        if isinstance(output, tuple):
            return (replace(output[0]), *output[1:])
        return replace(output)

    return module.register_forward_hook(after, prepend=True)


def decoder_layers(lm: Any) -> nn.ModuleList:
    """The model's transformer blocks (LLaMA's ``layers``, GPT-2's ``h``).

    Raises:
        ModelError: The model has none that ctexp knows.
    """
    base = lm.base_model
    for name in ("layers", "h"):
        blocks = getattr(base, name, None)
        if isinstance(blocks, nn.ModuleList):
            return blocks
    raise ModelError(f"cannot find the blocks of {type(lm).__name__}; ctexp supports LLaMA- and GPT-2-style models")


# --- what replaces a site -------------------------------------------------------------------------


def derangement(n: int, seed: int) -> list[int]:
    """A uniformly drawn permutation of ``range(n)`` without fixed points (``n >= 2``), fixed by ``seed``."""
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 items, not {n}")
    rng = np.random.default_rng(seed)
    while True:  # about e draws on average
        order = rng.permutation(n)
        if not (order == np.arange(n)).any():
            return order.tolist()


def replacement(
    mode: Mode,
    recorded: torch.Tensor,
    *,
    tokens: torch.Tensor | None = None,
    embedding: torch.Tensor | None = None,
    permutation: list[int] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The values that replace a site at one position, for every problem.

    Args:
        mode: What replaces the site.
        recorded: The site's values in the control pass, (n, d).
        tokens: Token ids per problem for ``decoded``/``target`` (n,); ``NO_TOKEN`` keeps the problem's value.
        embedding: The model's input embedding matrix (for ``decoded``/``target``).
        permutation: Problem ``i`` takes problem ``permutation[i]``'s value (``swap``).
        generator: The noise's random source (``noise``).

    Returns:
        (n, d) float32 values on the CPU.
    """
    values = recorded.float().cpu()  # (n, d)
    if mode is Mode.NONE:
        return values.clone()
    if mode is Mode.ZERO:
        return torch.zeros_like(values)
    if mode is Mode.MEAN:
        if len(values) < 2:
            raise ValueError("mode mean needs at least 2 problems")
        return (values.sum(0, keepdim=True) - values) / (len(values) - 1)  # each problem: the others' mean
    if mode is Mode.SWAP:
        assert permutation is not None
        return values[permutation].clone()
    if mode is Mode.NOISE:
        noise = torch.randn(values.shape, generator=generator)  # (n, d)
        return noise * values.norm(dim=-1, keepdim=True) / noise.norm(dim=-1, keepdim=True)
    assert tokens is not None and embedding is not None
    has = tokens != NO_TOKEN  # (n,)
    embedded = embedding.float().cpu()[tokens.clamp(min=0)]  # (n, d)
    return torch.where(has[:, None], embedded, values)


# --- passes over the problems ---------------------------------------------------------------------


@dataclass
class _Recording:
    """The site's values that the control pass saw, per position, for the current batch."""

    values: dict[int, torch.Tensor] = field(default_factory=dict)

    def __call__(self, position: int, value: torch.Tensor) -> torch.Tensor:
        self.values[position] = value[:, 0].detach().cpu()  # (B, d) in the model's dtype
        return value


@dataclass(frozen=True)
class ControlPass:
    """The unmodified answers and what the site held at every position it applies to."""

    answers: list[list[int]]  # answer ids per problem, in problem order
    recorded: torch.Tensor  # (n, P, d) in the model's dtype, P = site_positions(...)


Progress = Callable[[int], None]  # called with the number of problems just finished


@dataclass(frozen=True)
class Intervener:
    """Runs CODI over a fixed set of problems in fixed batches, with or without a patch.

    Attributes:
        codi: The loaded model.
        prompts: Question ids per problem (bot not appended).
        n_positions: Latent steps T (the store's).
        max_answer_tokens: Greedy answer decoding stops after this many tokens.
        batch_size: Problems per forward pass.
    """

    codi: CodiModel
    prompts: list[list[int]]
    n_positions: int
    max_answer_tokens: int
    batch_size: int

    def batches(self) -> list[list[int]]:
        """Problem indices per batch: longest question first, so that a batch wastes little padding."""
        order = sorted(range(len(self.prompts)), key=lambda i: (-len(self.prompts[i]), i))
        return [order[start : start + self.batch_size] for start in range(0, len(order), self.batch_size)]

    def control(self, site: Site, layer: int | None, progress: Progress | None = None) -> ControlPass:
        """Run CODI unmodified, recording the site's value at every position it applies to."""
        positions = site_positions(site, self.n_positions)
        recorded: list[torch.Tensor | None] = [None] * len(self.prompts)

        def patch(batch: list[int]) -> tuple[ThoughtPatch, Callable[[], None]]:
            recording = _Recording()

            def keep() -> None:
                stacked = torch.stack([recording.values[p] for p in positions], dim=1)  # (B, P, d)
                for row, index in enumerate(batch):
                    recorded[index] = stacked[row]

            return SitePatch(site, layer, frozenset(positions), recording), keep

        answers = self._passes(patch, progress)
        return ControlPass(answers, torch.stack([r for r in recorded if r is not None]))  # (n, P, d)

    def replaced(
        self, site: Site, layer: int | None, values: dict[int, torch.Tensor], progress: Progress | None = None
    ) -> list[list[int]]:
        """Run CODI with the site replaced at each given position by ``values[position]`` (n, d).

        Returns:
            Answer ids per problem, in problem order.
        """

        def patch(batch: list[int]) -> tuple[ThoughtPatch, Callable[[], None]]:
            rows = torch.tensor(batch)

            def apply(position: int, value: torch.Tensor) -> torch.Tensor:
                new = values[position][rows].to(device=value.device, dtype=value.dtype)  # (B, d)
                return new.view_as(value)

            return SitePatch(site, layer, frozenset(values), apply), lambda: None

        return self._passes(patch, progress)

    def _passes(
        self, patch: Callable[[list[int]], tuple[ThoughtPatch, Callable[[], None]]], progress: Progress | None
    ) -> list[list[int]]:
        answers: list[list[int]] = [[] for _ in self.prompts]
        for batch in self.batches():
            one, finish = patch(batch)
            thoughts = self.codi.think([self.prompts[i] for i in batch], self.n_positions, self.max_answer_tokens, one)
            finish()
            for index, ids in zip(batch, thoughts.answers, strict=True):
                answers[index] = ids
            if progress is not None:
                progress(len(batch))
        return answers
