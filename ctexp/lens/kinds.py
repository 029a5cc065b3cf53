"""Lenses: translators indexed by {layer, position}, then the model's frozen final norm and unembedding.

One class per lens kind, as in tuned-lens: ``Lens`` is a plain ``nn.Module`` and each kind says how
it maps states (its parameters and ``translate``). Kinds are registered by name
(``@register_lens_kind("layer")``); ``lens_class(name)`` and ``Lens.build(kind, ...)`` are the one way
from a name to a lens, and ``Lens.load`` reads a saved lens back into its kind. Adding a kind is a
class here (and a ``LensKind`` value in ``ctexp.config`` for the CLI to offer it).

Translators are residual, ``h -> h + h A + b`` with A and b starting at zero, as in tuned-lens: the
lens starts as the logit lens, and weight decay pulls it back towards it. All translators of a lens
live in one stacked tensor and are applied in one batched product: no Python work per layer or
position. Lenses indexed by position compute every position's translation and gather the sample's
own (T times the translator cost, still a few percent of the unembedding's).

Training does not need autograd. The loss against the frozen head (``head_loss_and_grad``) gives the
gradient with respect to the lens output, and ``Lens.write_grads`` turns it into the parameters'
gradients. A kind may bring a hand-written backward for that (``write_translator_grads``: a few
batched products, no graph; at the small shapes of a lens step autograd's bookkeeping costs more than
the arithmetic); a kind without one gets autograd (forward with grad, backward of
``(out * grad_out).sum()``), which is correct for any ``translate`` and only slower.

The residual kinds give their translator weights' gradients as ``Factors`` (``Lens.gradients``): each
is a product of thin matrices (the states and output gradients of the rows of one translator), so
the optimiser (``ctexp.lens.update``) can clip from small Gram matrices and form each gradient entry
where it uses it instead of reading a dense gradient back.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from pydantic import BaseModel
from torch import nn

from ctexp.config import AdapterKind
from ctexp.errors import ConfigError
from ctexp.lens.adapters import grad_buffer, position_adapter
from ctexp.lens.factors import Factors
from ctexp.lens.saved import LENS_JSON, LensSpec, read_spec, read_weights, write_lens

GRAM_NORM_MIN_ELEMENTS = 1 << 22  # factored weights from which ``Lens.write_grads`` returns the norm

LensClass = TypeVar("LensClass", bound="type[Lens]")


class Lens(nn.Module):
    """Translators for a set of layers and positions (the head is kept apart: it is frozen and shared).

    Subclasses register with ``@register_lens_kind(name)``, create their parameters in ``__init__``
    (after ``super().__init__``) and define ``translate``; they may define ``write_translator_grads``.

    Args:
        n_layers: number of selected layers (the lens's layer axis follows the selection order).
        n_positions: number of CT positions T in the store.
        hidden: hidden size d.
        adapter: optional per-position context (``ctexp.lens.adapters``), for kinds not indexed by position.
        rank: rank of the low-rank adapter.
        seed: of the low-rank adapter's random initialisation.
    """

    kind: ClassVar[str]  # the registered name, set by ``register_lens_kind``
    indexed_by_position: ClassVar[bool] = False  # translators per position: no position adapter

    def __init__(
        self,
        n_layers: int,
        n_positions: int,
        hidden: int,
        adapter: AdapterKind | str = AdapterKind.NONE,
        rank: int = 4,
        seed: int = 0,
    ) -> None:
        super().__init__()
        adapter = _adapter_kind(adapter)
        if adapter is not AdapterKind.NONE and self.indexed_by_position:
            raise ConfigError(
                f"adapter {adapter.value!r} is for lenses shared across positions, "
                f"not {getattr(self, 'kind', type(self).__name__)!r}"
            )
        self.adapter, self.rank = adapter, rank
        self.n_layers, self.n_positions, self.hidden = n_layers, n_positions, hidden
        self.position_adapter = position_adapter(adapter, n_positions, hidden, rank, seed)

    @classmethod
    def build(
        cls,
        kind: str,
        n_layers: int,
        n_positions: int,
        hidden: int,
        adapter: AdapterKind | str = AdapterKind.NONE,
        rank: int = 4,
        seed: int = 0,
    ) -> Lens:
        """A new lens of the registered ``kind`` (a name or a ``LensKind``); see the class for the rest.

        Raises:
            ConfigError: an unknown kind or adapter, or an adapter on a kind indexed by position.
        """
        return lens_class(kind)(n_layers, n_positions, hidden, adapter, rank, seed)

    @property
    def trainable(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

    @classmethod
    def has_fast_backward(cls) -> bool:
        """Whether the kind brings its own ``write_translator_grads`` (else training uses autograd)."""
        return cls.write_translator_grads is not Lens.write_translator_grads

    def forward(self, h: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """Translate states. h: (B, L, d); position: (B,). Returns (B, L, d)."""
        out = self.translate(h, position)
        # Checked on the enum, not the submodule: nn.Module's attribute lookup of a submodule costs
        # about a microsecond, and so does Module.__call__'s hook dispatch; for the default world's
        # sub-millisecond steps both were measurable.
        if self.adapter is not AdapterKind.NONE:
            out = out + self.position_adapter.forward(h, position)
        return out

    def translate(self, h: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """The kind's own map, before any adapter. h: (B, L, d); position: (B,). Returns (B, L, d)."""
        raise NotImplementedError(f"lens kind {type(self).__name__} defines no translate()")

    def write_translator_grads(
        self, h: torch.Tensor, position: torch.Tensor, g: torch.Tensor, onehot_t: torch.Tensor | None
    ) -> None:
        """Optional: set the kind's own parameters' ``.grad`` to the gradient of ``(translate * g).sum()``.

        ``onehot_t`` (T, B) is the positions as a one-hot matrix where the kind is indexed by position
        or has an adapter (else None). Write into ``grad_buffer(param)`` with ``out=`` to reuse buffers.
        """
        raise NotImplementedError

    def write_grads(self, h: torch.Tensor, position: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor | None:
        """Set each parameter's ``.grad`` to the gradient of ``(self(h, position) * grad_out).sum()``.

        The training step's backward. With the kind's hand-written backward: no graph, no Python work
        per layer, position or sample, ``.grad`` buffers reused from step to step (``out=``); terms
        indexed by position are summed with a one-hot matrix product (deterministic, no atomics).
        Without one: autograd. ``h`` (the input states) is a constant.

        Returns the squared norm of all the gradients where their factors give it more cheaply than
        a pass over them (large translators, few rows: for clipping), else None.
        """
        factored = self.gradients(h, position, grad_out)
        for name, factors in factored.items():
            factors.dense(out=grad_buffer(self.get_parameter(name)))
        large = [f for f in factored.values() if f.numel() >= GRAM_NORM_MIN_ELEMENTS and f.thin()]
        if not factored or len(large) < len(factored):
            return None
        others = [p.grad for name, p in self.named_parameters() if p.requires_grad and name not in factored]
        squared = torch.stack([f.squared_norm() for f in large]).sum()
        return squared + sum(torch.linalg.vector_norm(g).square() for g in others) if others else squared

    def gradients(self, h: torch.Tensor, position: torch.Tensor, grad_out: torch.Tensor) -> dict[str, Factors]:
        """``write_grads`` without forming the large gradients: those come back as ``Factors`` by parameter name.

        Every other trainable parameter's ``.grad`` is written (small ones: biases, adapters; and
        every parameter of a kind without a hand-written backward).
        """
        if not self.has_fast_backward():
            self._autograd_grads(h, position, grad_out)
            return {}
        onehot_t, adapted = None, self.adapter is not AdapterKind.NONE  # the enum: see forward
        if self.indexed_by_position or adapted:
            slots = torch.arange(self.n_positions, device=position.device).unsqueeze(1)
            onehot_t = (slots == position.unsqueeze(0)).to(grad_out.dtype)  # (T, B): no range check, no sync
        factored = self.translator_factors(h, position, grad_out, onehot_t)
        if adapted:
            self.position_adapter.write_grads(h, position, grad_out, onehot_t)
        return factored

    def translator_factors(
        self, h: torch.Tensor, position: torch.Tensor, g: torch.Tensor, onehot_t: torch.Tensor | None
    ) -> dict[str, Factors]:
        """The kind's own gradients: factored ones returned by name, the rest written (``write_translator_grads``)."""
        self.write_translator_grads(h, position, g, onehot_t)
        return {}

    def _autograd_grads(self, h: torch.Tensor, position: torch.Tensor, grad_out: torch.Tensor) -> None:
        """``write_grads`` for kinds without a hand-written backward: forward with grad, then backward."""
        params = [p for p in self.parameters() if p.requires_grad]
        with torch.enable_grad():
            out = self(h, position)
            if not out.requires_grad:  # no parameter takes part: every gradient is zero
                grads = [torch.zeros_like(p) for p in params]
            else:
                grads = torch.autograd.grad(out, params, grad_out, allow_unused=True, materialize_grads=True)
        for param, grad in zip(params, grads, strict=True):
            param.grad = grad

    def spec(self, layers: list[int], config: Mapping[str, Any] | BaseModel | None) -> LensSpec:
        """What ``save`` writes to ``lens.json``."""
        if isinstance(config, BaseModel):
            config = config.model_dump(mode="json")
        return LensSpec(
            kind=self.kind, adapter=self.adapter, rank=self.rank, n_layers=self.n_layers,
            n_positions=self.n_positions, hidden=self.hidden, layers=list(layers),
            config=None if config is None else dict(config),
        )

    def save(self, directory: Path, layers: list[int], config: Mapping[str, Any] | BaseModel) -> None:
        """Write ``lens.safetensors`` (weights) and ``lens.json`` (kind, shape, layers, experiment config).

        Args:
            directory: an existing directory.
            layers: the hidden-state indices of the lens's layer axis, in its order.
            config: the experiment config the lens was trained under (an ``ExperimentConfig`` or its dict).

        Raises:
            StoreError: the files cannot be written.
        """
        write_lens(Path(directory), self.spec(layers, config), self.state_dict())

    @staticmethod
    def load(directory: Path, device: torch.device | str = "cpu") -> tuple[Lens, LensSpec]:
        """Read a lens written by ``save`` into its kind's class, with its weights.

        Returns:
            The lens (on ``device``, in eval mode) and its saved spec (layers, experiment config).

        Raises:
            StoreError: missing, unreadable or malformed files, or weights that do not fit the spec.
            ConfigError: a lens kind that is not registered.
        """
        spec = read_spec(Path(directory))
        try:
            lens = Lens.build(spec.kind, spec.n_layers, spec.n_positions, spec.hidden, spec.adapter, spec.rank)
        except ConfigError as error:
            raise ConfigError(f"{Path(directory) / LENS_JSON}: {error}") from None
        lens.load_state_dict(read_weights(Path(directory), spec.kind, lens.state_dict()))
        return lens.to(device).eval(), spec


def register_lens_kind(name: str) -> Callable[[LensClass], LensClass]:
    """Class decorator: register a ``Lens`` subclass as the lens kind ``name``.

    The registry is the class hierarchy itself (``lens_kinds`` walks ``Lens``'s subclasses for the
    ones registered), so there is no table to keep in step and no module-level state.

    Raises:
        ConfigError: ``name`` is taken by another class.
    """

    def register(cls: LensClass) -> LensClass:
        if not (isinstance(cls, type) and issubclass(cls, Lens)):
            raise TypeError(f"register_lens_kind({name!r}) decorates Lens subclasses, not {cls!r}")
        taken = lens_kinds().get(name)
        if taken is not None and taken is not cls:
            raise ConfigError(f"lens kind {name!r} is already registered by {taken.__module__}.{taken.__qualname__}")
        cls.kind = name
        return cls

    return register


def lens_kinds() -> dict[str, type[Lens]]:
    """Every registered lens kind by name (built-in and others), sorted by name."""
    found: dict[str, type[Lens]] = {}
    pending = list(Lens.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if "kind" in vars(cls):  # registered itself, not merely a subclass of a registered kind
            found[cls.kind] = cls
    return dict(sorted(found.items()))


def lens_class(kind: str) -> type[Lens]:
    """The class of the registered lens kind ``kind`` (a name or a ``LensKind``).

    Raises:
        ConfigError: no kind of that name is registered (the message lists the known ones).
    """
    kinds = lens_kinds()
    if str(kind) not in kinds:
        raise ConfigError(f"unknown lens kind {str(kind)!r}; known kinds: {', '.join(kinds)}")
    return kinds[str(kind)]


@register_lens_kind("identity")
class IdentityLens(Lens):
    """The logit lens: states go to the head as they are (with an adapter, only it is trained)."""

    def translate(self, h: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        return h

    def write_translator_grads(
        self, h: torch.Tensor, position: torch.Tensor, g: torch.Tensor, onehot_t: torch.Tensor | None
    ) -> None:
        """Nothing of its own to train."""


class ResidualLens(Lens):
    """Residual affine translators ``h -> h + h A + b`` stacked over ``group_shape()`` axes, A and b at zero.

    Zero start: the lens starts as the logit lens, and weight decay pulls it back towards it.
    """

    def __init__(
        self,
        n_layers: int,
        n_positions: int,
        hidden: int,
        adapter: AdapterKind | str = AdapterKind.NONE,
        rank: int = 4,
        seed: int = 0,
    ) -> None:
        super().__init__(n_layers, n_positions, hidden, adapter, rank, seed)
        group = self.group_shape()
        self.weight = nn.Parameter(torch.zeros(*group, hidden, hidden))
        self.bias = nn.Parameter(torch.zeros(*group, hidden))

    def group_shape(self) -> tuple[int, ...]:
        """The axes the translators are indexed by (``()``: one translator)."""
        raise NotImplementedError

    def delta(self, h: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """``h A + b`` with each state's own translator. h: (B, L, d). Returns (B, L, d)."""
        raise NotImplementedError

    def translate(self, h: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        return h + self.delta(h, position)

    @classmethod
    def has_fast_backward(cls) -> bool:
        """Residual kinds are fast where they give their weight's gradient as factors."""
        return cls.weight_factors is not ResidualLens.weight_factors

    def weight_factors(
        self, h: torch.Tensor, position: torch.Tensor, g: torch.Tensor, onehot_t: torch.Tensor | None
    ) -> Factors:
        """The gradient of ``weight`` as ``left^T right`` over the translator axes."""
        raise NotImplementedError

    def write_bias_grad(self, g: torch.Tensor, onehot_t: torch.Tensor | None) -> None:
        """Set ``bias.grad`` to the gradient of ``(delta * g).sum()``."""
        raise NotImplementedError

    def translator_factors(
        self, h: torch.Tensor, position: torch.Tensor, g: torch.Tensor, onehot_t: torch.Tensor | None
    ) -> dict[str, Factors]:
        self.write_bias_grad(g, onehot_t)
        return {"weight": self.weight_factors(h, position, g, onehot_t)}

    def write_translator_grads(
        self, h: torch.Tensor, position: torch.Tensor, g: torch.Tensor, onehot_t: torch.Tensor | None
    ) -> None:
        """The weight's gradient formed from its factors (a few batched products), the bias's summed."""
        self.weight_factors(h, position, g, onehot_t).dense(out=grad_buffer(self.weight))
        self.write_bias_grad(g, onehot_t)


@register_lens_kind("global")
class GlobalLens(ResidualLens):
    """One translator for every cell."""

    def group_shape(self) -> tuple[int, ...]:
        return ()

    def delta(self, h: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        return h @ self.weight + self.bias  # (B, L, d)

    def weight_factors(
        self, h: torch.Tensor, position: torch.Tensor, g: torch.Tensor, onehot_t: torch.Tensor | None
    ) -> Factors:
        """(B*L, d) and (B*L, d): every state shares the translator."""
        hidden = h.shape[2]
        return Factors(h.reshape(-1, hidden), g.reshape(-1, hidden))

    def write_bias_grad(self, g: torch.Tensor, onehot_t: torch.Tensor | None) -> None:
        torch.sum(g, dim=(0, 1), out=grad_buffer(self.bias))


@register_lens_kind("layer")
class LayerLens(ResidualLens):
    """One translator per layer, shared across positions (the reference's lens)."""

    def group_shape(self) -> tuple[int, ...]:
        return (self.n_layers,)

    def delta(self, h: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        # One batched product over layers: (L, B, d) @ (L, d, d), bias added by the same kernel.
        return torch.baddbmm(self.bias.unsqueeze(1), h.transpose(0, 1), self.weight).transpose(0, 1)

    def weight_factors(
        self, h: torch.Tensor, position: torch.Tensor, g: torch.Tensor, onehot_t: torch.Tensor | None
    ) -> Factors:
        """Per layer H_l^T G_l: (L, B, d) and (L, B, d)."""
        return Factors(h.transpose(0, 1), g.transpose(0, 1))

    def write_bias_grad(self, g: torch.Tensor, onehot_t: torch.Tensor | None) -> None:
        torch.sum(g, dim=0, out=grad_buffer(self.bias))  # (L, d)


@register_lens_kind("position")
class PositionLens(ResidualLens):
    """One translator per position, shared across layers."""

    indexed_by_position = True

    def group_shape(self) -> tuple[int, ...]:
        return (self.n_positions,)

    def delta(self, h: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(h.shape[0], device=h.device)
        every = torch.einsum("bld,tde->blte", h, self.weight) + self.bias  # (B, L, T, d)
        return every[rows, :, position]

    def weight_factors(
        self, h: torch.Tensor, position: torch.Tensor, g: torch.Tensor, onehot_t: torch.Tensor | None
    ) -> Factors:
        """States masked by position (T, B*L, d) against all gradients (B*L, d): no per-sample scatter."""
        batch, n_layers, hidden = h.shape
        masked = (onehot_t.view(-1, batch, 1, 1) * h).reshape(-1, batch * n_layers, hidden)
        return Factors(masked, g.reshape(batch * n_layers, hidden))

    def write_bias_grad(self, g: torch.Tensor, onehot_t: torch.Tensor | None) -> None:
        torch.mm(onehot_t, g.sum(1), out=grad_buffer(self.bias))  # (T, d)


@register_lens_kind("layer-position")
class LayerPositionLens(ResidualLens):
    """One translator per (layer, position) cell."""

    indexed_by_position = True

    def group_shape(self) -> tuple[int, ...]:
        return (self.n_layers, self.n_positions)

    def delta(self, h: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(h.shape[0], device=h.device)
        every = torch.einsum("bld,ltde->blte", h, self.weight) + self.bias  # (B, L, T, d)
        return every[rows, :, position]

    def weight_factors(
        self, h: torch.Tensor, position: torch.Tensor, g: torch.Tensor, onehot_t: torch.Tensor | None
    ) -> Factors:
        """Per layer, states masked by position (L, T, B, d) against the layer's gradients (L, 1, B, d)."""
        batch = h.shape[0]
        masked = onehot_t.view(1, -1, batch, 1) * h.transpose(0, 1).unsqueeze(1)
        return Factors(masked, g.transpose(0, 1).unsqueeze(1))

    def write_bias_grad(self, g: torch.Tensor, onehot_t: torch.Tensor | None) -> None:
        torch.matmul(onehot_t, g.transpose(0, 1), out=grad_buffer(self.bias))  # (L, T, d)


def _adapter_kind(adapter: AdapterKind | str) -> AdapterKind:
    try:
        return AdapterKind(adapter)
    except ValueError:
        known = ", ".join(kind.value for kind in AdapterKind)
        raise ConfigError(f"unknown adapter {adapter!r}; known adapters: {known}") from None
