"""The fast training step computes what the straightforward one does.

The step of ``train_lens`` (chunked head cross-entropy with its gradient computed alongside the
logits, hand-written lens gradients, fused AdamW with clipping folded in, bf16 products where
chosen) is compared with a plain float32 computation: full logits, ``log_softmax``, autograd,
``torch.optim.AdamW`` after ``clip_grad_norm_``; and each built-in lens kind's batched forward with
the lens applied sample by sample. Small random shapes, every registered built-in lens kind with
every adapter it takes, several -1-padded targets per sample, both norms, every update mode
(``ctexp.lens.update``: dense gradients and fused AdamW; factored gradients in plain torch; the same
compiled, where each gradient entry is formed inside the update; tiled, each gradient formed and
applied a block of rows at a time).
"""

from __future__ import annotations

import pytest
import torch

from ctexp.config import AdapterKind, LensKind, TrainConfig
from ctexp.data.store import NormSpec, Store, StoreMeta
from ctexp.lens import head as head_module
from ctexp.lens import train
from ctexp.lens import update as update_module
from ctexp.lens.head import Head, LossTargets, head_cross_entropy, head_loss_and_grad, scores
from ctexp.lens.kinds import Lens, lens_kinds
from ctexp.lens.scratch import Scratch
from ctexp.lens.train import FusedAdamW, SplitTensors, TrainStep, batches, evaluate_split, train_lens
from ctexp.lens.update import UPDATE_MODES, resolve_update_mode

B, L, T, D, V, K = 7, 3, 4, 16, 53, 4


def builtin_cases() -> list[tuple[str, AdapterKind]]:
    """Every built-in lens kind from the registry, with every adapter it takes."""
    return [
        (kind, adapter)
        for kind, cls in lens_kinds().items()
        if cls.__module__.startswith("ctexp.")  # kinds other tests register are theirs to check
        for adapter in AdapterKind
        if adapter is AdapterKind.NONE or not cls.indexed_by_position
    ]


CASES = builtin_cases()
CASE_IDS = [f"{kind}-{adapter.value}" for kind, adapter in CASES]
TRAINED = [case for case in CASES if Lens.build(case[0], L, T, D, case[1]).trainable]  # the logit lens is not
TRAINED_IDS = [f"{kind}-{adapter.value}" for kind, adapter in TRAINED]


def make_head(norm: str = "rmsnorm", normed: tuple[int, ...] = (L - 1,), seed: int = 0) -> Head:
    generator = torch.Generator().manual_seed(seed)
    meta = StoreMeta(
        model="test", n_problems=1, n_states=L, n_positions=T, hidden=D, vocab=V, dtype="float32",
        tokenizer="builtin", norm=NormSpec(kind=norm), normed_states=list(normed),
    )
    bias = 0.1 * torch.randn(D, generator=generator) if norm == "layernorm" else None
    store = Store(meta, torch.empty(0), 1 + 0.1 * torch.randn(D, generator=generator), bias,
                  torch.randn(V, D, generator=generator), [])
    return Head(store, list(range(L)))


def make_lens(kind: str, adapter: AdapterKind, seed: int = 0) -> Lens:
    lens = Lens.build(kind, L, T, D, adapter, rank=3, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # away from zero, so that every term of the gradient is exercised
        for p in lens.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=generator))
    return lens


def make_batch(n: int = B, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """States, positions and -1-padded multi-target rows, with a repeated target and an empty row."""
    generator = torch.Generator().manual_seed(seed)
    states = torch.randn(n, L, D, generator=generator)
    position = torch.randint(0, T, (n,), generator=generator)
    targets = torch.randint(0, V, (n, K), generator=generator)
    targets[0, 1:] = -1  # one target
    if n > 1:
        position[1] = position[0]  # two samples share a position
    if n > 4:
        targets[2, 1] = targets[2, 0]  # a token twice
        targets[3, 2:] = -1
        targets[4] = -1  # no target at all: loss 0, no gradient
    return states, position, targets


# The built-in kinds' translators written out for one state x at one layer and position t.
PLAIN_TRANSLATORS = {
    "identity": lambda lens, x, layer, t: x,
    "global": lambda lens, x, layer, t: x + x @ lens.weight + lens.bias,
    "layer": lambda lens, x, layer, t: x + x @ lens.weight[layer] + lens.bias[layer],
    "position": lambda lens, x, layer, t: x + x @ lens.weight[t] + lens.bias[t],
    "layer-position": lambda lens, x, layer, t: x + x @ lens.weight[layer, t] + lens.bias[layer, t],
}


def plain_translate(lens: Lens, h: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """The lens written out sample by sample and layer by layer."""
    translator = PLAIN_TRANSLATORS[lens.kind]
    rows = []
    for i in range(h.shape[0]):
        t = int(position[i])
        layers = []
        for layer in range(h.shape[1]):
            x = h[i, layer]
            y = translator(lens, x, layer, t)
            if lens.adapter is AdapterKind.BIAS:
                y = y + lens.position_adapter.bias[t]
            elif lens.adapter is AdapterKind.LOWRANK:
                y = y + (x @ lens.position_adapter.down[t]) @ lens.position_adapter.up[t]
            layers.append(y)
        rows.append(torch.stack(layers))
    return torch.stack(rows)


def plain_loss(head: Head, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-state cross-entropy, the straightforward way: full float32 logits and log_softmax."""
    eps = head.norm_spec.eps
    if head.norm_spec.kind == "rmsnorm":
        normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * head.norm_weight
    else:
        centered = h - h.mean(-1, keepdim=True)
        normed = centered * torch.rsqrt(centered.pow(2).mean(-1, keepdim=True) + eps) * head.norm_weight
        normed = normed + head.norm_bias
    x = torch.where(head.needs_norm.view(1, -1, 1), normed, h)
    log_probs = torch.log_softmax(x @ head.unembed.T, dim=-1)  # (B, L, V)
    valid = (targets >= 0).float()
    index = targets.clamp(min=0).unsqueeze(1).expand(-1, h.shape[1], -1)
    picked = log_probs.gather(-1, index) * valid.unsqueeze(1)
    return -picked.sum(-1) / valid.sum(-1).clamp(min=1).unsqueeze(1)  # (B, L)


def autograd_grads(lens: Lens, head: Head, states, position, targets) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The lens's own forward, the plain loss, and autograd: what ``write_grads`` must equal."""
    loss = plain_loss(head, lens(states, position), targets).mean()
    params = list(lens.parameters())
    return loss.detach(), list(torch.autograd.grad(loss, params)) if params else []


def fast_grads(lens: Lens, head: Head, states, position, targets, dtype=torch.float32, chunk=None):
    """Exactly what ``TrainStep`` does before the optimiser."""
    extra = {} if chunk is None else {"chunk_elements": chunk}
    with torch.no_grad():
        h = lens(states, position)
        loss, grad = head_loss_and_grad(h, head, LossTargets.of(targets), dtype, mean=True, **extra)
        lens.write_grads(states, position, grad)
    return loss, [p.grad.clone() for p in lens.parameters()]


def assert_grads_close(got: list[torch.Tensor], want: list[torch.Tensor], rtol: float) -> None:
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        error = float((g - w).norm() / w.norm().clamp(min=1e-12))
        assert error < rtol, error


def test_every_builtin_kind_is_checked():
    assert {kind for kind, _ in CASES} == {kind.value for kind in LensKind}
    assert {adapter for _, adapter in CASES} == set(AdapterKind)


@pytest.mark.parametrize(("kind", "adapter"), CASES, ids=CASE_IDS)
def test_batched_forward_matches_the_sample_loop(kind, adapter):
    if kind not in PLAIN_TRANSLATORS:
        pytest.fail(f"lens kind {kind!r} has no sample-by-sample reference in PLAIN_TRANSLATORS: write one")
    lens = make_lens(kind, adapter)
    states, position, _ = make_batch()
    with torch.no_grad():
        torch.testing.assert_close(lens(states, position), plain_translate(lens, states, position))


@pytest.mark.parametrize(("kind", "adapter"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
@pytest.mark.parametrize("samples", [1, 2, B])  # the layer lens has its own path for 1 or 2 samples
def test_write_grads_matches_autograd(kind, adapter, norm, samples):
    """The kind's hand-written backward (where it has one) against autograd on the same batch."""
    head, lens = make_head(norm), make_lens(kind, adapter)
    states, position, targets = make_batch(samples)
    want_loss, want = autograd_grads(lens, head, states, position, targets)
    for chunk in (None, 1):  # one chunk; one sample per chunk
        loss, got = fast_grads(lens, head, states, position, targets, chunk=chunk)
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
        assert_grads_close(got, want, rtol=1e-5)


@pytest.mark.parametrize("adapter", [AdapterKind.NONE, AdapterKind.BIAS, AdapterKind.LOWRANK], ids=lambda v: v.value)
@pytest.mark.parametrize("samples", [1, 2])
def test_gradient_norm_from_the_factors(monkeypatch, adapter, samples):
    """Large layer lenses return the gradients' squared norm from Gram matrices; it is the norm."""
    from ctexp.lens import kinds as lens_module

    monkeypatch.setattr(lens_module, "GRAM_NORM_MIN_ELEMENTS", 0)
    head, lens = make_head(), make_lens(LensKind.LAYER, adapter)
    states, position, targets = make_batch(samples)
    with torch.no_grad():
        _, grad = head_loss_and_grad(lens(states, position), head, targets, mean=True)
        squared = lens.write_grads(states, position, grad)
    assert squared is not None
    direct = sum(float(p.grad.square().sum()) for p in lens.parameters())
    assert float(squared) == pytest.approx(direct, rel=1e-5)


@pytest.mark.parametrize(("kind", "adapter"), CASES, ids=CASE_IDS)
def test_bf16_products_match_fp32_within_tolerance(kind, adapter):
    head, lens = make_head(), make_lens(kind, adapter)
    states, position, targets = make_batch()
    loss32, grads32 = fast_grads(lens, head, states, position, targets, torch.float32)
    loss16, grads16 = fast_grads(lens, head, states, position, targets, torch.bfloat16)
    # bf16 operands carry 8 significant bits: logits of magnitude ~5 move by ~0.02.
    assert abs(float(loss16 - loss32)) < 0.05 * max(1.0, abs(float(loss32)))
    assert_grads_close(grads16, grads32, rtol=3e-2)


@pytest.mark.parametrize("normed", [(), (1,), (0, 1, 2)])
@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
def test_head_cross_entropy_is_the_plain_loss_under_autograd(norm, normed):
    head = make_head(norm, normed)
    states, _, targets = make_batch()
    h = states.clone().requires_grad_()
    want = plain_loss(head, h, targets)
    want_grad, = torch.autograd.grad(want.square().sum(), h)  # a non-uniform incoming gradient
    for chunk in (1 << 24, V * L * 2, 1):
        got = head_cross_entropy(h, head, targets, chunk_elements=chunk)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        got_grad, = torch.autograd.grad(got.square().sum(), h)
        assert_grads_close([got_grad], [want_grad], rtol=1e-5)
    mean = head_cross_entropy(h, head, targets, mean=True)
    torch.testing.assert_close(mean, want.mean(), rtol=1e-5, atol=1e-6)
    # And it is the loss that evaluation reports.
    torch.testing.assert_close(scores(head(states), targets)["loss"], want.detach(), rtol=1e-5, atol=1e-6)


def test_fused_adamw_is_clip_then_torch_adamw():
    config = TrainConfig(lr=1e-2, weight_decay=1e-2, clip=1.0)
    generator = torch.Generator().manual_seed(0)
    ours = [torch.randn(4, 5, generator=generator), torch.randn(5, generator=generator)]
    theirs = [p.clone().requires_grad_() for p in ours]
    ours = [p.requires_grad_() for p in ours]
    optimizer, reference = FusedAdamW(ours, config), torch.optim.AdamW(theirs, lr=1e-2, weight_decay=1e-2)
    assert optimizer.fused
    for i in range(12):
        scale = 5.0 if i % 2 else 0.05  # clipping on every other step
        grads = [scale * torch.randn(p.shape, generator=generator) for p in ours]
        for p, g in zip(ours, grads):
            p.grad = g.clone()
        for p, g in zip(theirs, grads):
            p.grad = g.clone()
        # The squared norm handed in (as a layer lens gives it) or computed by the optimiser.
        optimizer.step(sum(g.square().sum() for g in grads) if i % 3 == 0 else None)
        torch.nn.utils.clip_grad_norm_(theirs, config.clip)
        reference.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)


# compiled: once per kind (each compiles for its shapes), at the size where the factors have the most rows.
# large: the head takes its large-head path (scratch memory, the gradient product on the transposed
# unembedding), as the reference's does; else the small-head path, as the default world's does.
MODE_CASES = [
    (kind, adapter, mode, samples, large)
    for kind, adapter in TRAINED
    for mode in ("dense", "plain", "compiled", "tiled")
    for samples, large in ([(2, False), (B, True)] if mode != "compiled" else [(B, True)])
]


@pytest.mark.parametrize(("kind", "adapter", "mode", "samples", "large"), MODE_CASES,
                         ids=[f"{k}-{a.value}-{m}-{n}{'-large' if big else ''}" for k, a, m, n, big in MODE_CASES])
def test_train_step_matches_plain_step(monkeypatch, kind, adapter, mode, samples, large):
    """Full steps (loss, gradients, clipping, AdamW) in each update mode against the plain one (autograd, torch's AdamW)."""
    from ctexp.lens import kinds as lens_module

    monkeypatch.setattr(lens_module, "GRAM_NORM_MIN_ELEMENTS", 0)  # the clipping norm from the factors, too
    if large:
        monkeypatch.setattr(head_module, "LARGE_HEAD_ELEMENTS", 0)
    monkeypatch.setattr(update_module, "TILE_BYTES", 3 * D * 4)  # tiled: blocks of 3 rows of one translator or fewer
    head = make_head()
    fast, plain = make_lens(kind, adapter), make_lens(kind, adapter)
    states, position, targets = make_batch(samples)
    config = TrainConfig(lr=1e-2, weight_decay=1e-2, clip=0.5)
    data = SplitTensors(states, position, targets)
    step = TrainStep(fast, head, data, config, precision="fp32", update=mode)
    assert step.update.mode == mode
    reference = torch.optim.AdamW(plain.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    for _ in range(3):
        loss = step(states, position, LossTargets.of(targets))
        want = plain_loss(head, plain(states, position), targets).mean()
        reference.zero_grad()
        want.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), config.clip)
        reference.step()
        torch.testing.assert_close(loss, want.detach(), rtol=1e-5, atol=1e-6)
    # Adam divides by the gradient's running rms: where a gradient element is rounding noise, so is
    # its step. Within 5% of one step of size lr, and far tighter on the norm.
    for a, b in zip(fast.parameters(), plain.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=0.05 * config.lr)
        assert float((a - b).detach().norm() / b.detach().norm()) < 1e-4


def test_tiled_update_needs_the_fused_kernel(monkeypatch):
    """Without torch's fused AdamW kernel, ``tiled`` runs as ``dense`` (torch's optimizer), and still trains right."""
    monkeypatch.delattr(torch, "_fused_adamw_")
    head, lens, plain = make_head(), make_lens(LensKind.LAYER, AdapterKind.NONE), make_lens(LensKind.LAYER, AdapterKind.NONE)
    states, position, targets = make_batch(2)
    config = TrainConfig(lr=1e-2, clip=0.5)
    step = TrainStep(lens, head, SplitTensors(states, position, targets), config, precision="fp32", update="tiled")
    assert step.update.mode == "dense"
    step(states, position, LossTargets.of(targets))
    reference = torch.optim.AdamW(plain.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    plain_loss(head, plain(states, position), targets).mean().backward()
    torch.nn.utils.clip_grad_norm_(plain.parameters(), config.clip)
    reference.step()
    for a, b in zip(lens.parameters(), plain.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=0.05 * config.lr)


def test_large_head_path_reuses_its_scratch_and_matches_the_small_one(monkeypatch):
    """The large-head path (one ``Scratch`` across calls of growing and shrinking batches and chunks, the
    gradient product on the transposed unembedding) computes what the small-head path does."""
    head, lens = make_head(), make_lens(LensKind.LAYER, AdapterKind.NONE)
    scratch = Scratch()
    for samples, chunk in [(2, None), (B, None), (3, None), (B, L * V * 2)]:
        states, position, targets = make_batch(samples)
        extra = {} if chunk is None else {"chunk_elements": chunk}
        with torch.no_grad():
            h = lens(states, position)
            for dtype, tolerance in ((torch.float32, 1e-6), (torch.bfloat16, 2e-2)):
                monkeypatch.setattr(head_module, "LARGE_HEAD_ELEMENTS", head.unembed.numel() + 1)
                want = head_loss_and_grad(h, head, targets, dtype, mean=True, **extra)
                monkeypatch.setattr(head_module, "LARGE_HEAD_ELEMENTS", 0)
                got = head_loss_and_grad(h, head, targets, dtype, mean=True, scratch=scratch, **extra)
                torch.testing.assert_close(got[0], want[0], rtol=tolerance, atol=tolerance)
                assert_grads_close([got[1]], [want[1]], tolerance)
    assert head.unembed_as(torch.float32, transposed=True).is_contiguous()
    torch.testing.assert_close(head.unembed_as(torch.bfloat16, transposed=True), head.unembed.t().bfloat16())


def test_update_modes_resolve():
    # measured fastest on the CPU: tiled for large lenses, dense for small ones
    assert resolve_update_mode("auto", torch.device("cpu")) == "dense"
    assert resolve_update_mode("auto", torch.device("cpu"), update_module.TILED_MIN_ELEMENTS) == "tiled"
    assert resolve_update_mode("auto", torch.device("cpu"), update_module.TILED_MIN_ELEMENTS - 1) == "dense"
    assert resolve_update_mode("auto", torch.device("cuda")) == "compiled"
    assert [resolve_update_mode(mode, torch.device("cpu")) for mode in UPDATE_MODES[1:]] == list(UPDATE_MODES[1:])
    with pytest.raises(ValueError, match="update mode"):
        resolve_update_mode("fused", torch.device("cpu"))


@pytest.mark.parametrize(("kind", "adapter"), TRAINED, ids=TRAINED_IDS)
@pytest.mark.parametrize("samples", [1, 2, B])
def test_factors_are_the_gradient(kind, adapter, samples):
    """``Lens.gradients``: the factored weights' products and Gram norms are ``write_grads``'s gradients."""
    head, lens = make_head(), make_lens(kind, adapter)
    states, position, targets = make_batch(samples)
    _, want = fast_grads(lens, head, states, position, targets)
    with torch.no_grad():
        _, grad = head_loss_and_grad(lens(states, position), head, targets, mean=True)
        factored = lens.gradients(states, position, grad)
    assert set(factored) == ({"weight"} if kind != "identity" else set())
    for (name, param), expected in zip(lens.named_parameters(), want, strict=True):
        got = factored[name].dense() if name in factored else param.grad
        assert_grads_close([got], [expected], rtol=1e-5)
        if name in factored:
            assert float(factored[name].squared_norm()) == pytest.approx(float(expected.square().sum()), rel=1e-4)


def _split(n: int, seed: int) -> SplitTensors:
    states, position, targets = make_batch(n, seed)
    return SplitTensors(states, position, targets)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cpu_training_is_deterministic(precision):
    head = make_head()
    train_split, val_split = _split(40, 1), _split(12, 2)
    config = TrainConfig(batch_size=3 * L, epochs=3, patience=3, lr=1e-2)
    runs = []
    for _ in range(2):
        lens = make_lens(LensKind.LAYER, AdapterKind.LOWRANK)
        outcome = train_lens(lens, head, train_split, val_split, config, seed=7, precision=precision)
        runs.append(([(e.train_loss, e.val_loss, e.val_top1) for e in outcome.epochs], lens.state_dict()))
    assert runs[0][0] == runs[1][0]
    for name, value in runs[0][1].items():
        assert torch.equal(value, runs[1][1][name]), name


def test_precision_resolution():
    head = make_head()
    cpu = torch.device("cpu")
    assert train.resolve_dtype("fp32", cpu, head) is torch.float32
    assert train.resolve_dtype("bf16", cpu, head) is torch.bfloat16
    assert train.resolve_dtype("auto", cpu, head) is torch.float32  # a small head stays fp32 on CPU
    with pytest.raises(ValueError):
        train.resolve_dtype("fp16", cpu, head)


def test_evaluation_is_chunked_and_unchanged(monkeypatch):
    head, lens = make_head(), make_lens(LensKind.LAYER, AdapterKind.NONE)
    data = _split(23, 3)
    whole = evaluate_split(lens, head, data)
    monkeypatch.setattr(train, "EVAL_LOGIT_ELEMENTS", 2 * L * V)  # two samples per batch
    chunked = evaluate_split(lens, head, data)
    for key, value in whole.items():
        torch.testing.assert_close(chunked[key], value)


def test_batches_cover_the_epoch_in_order(monkeypatch):
    data = _split(23, 4)
    order = torch.randperm(23, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(train, "GATHER_BLOCK_BYTES", 5 * L * D * 4)  # blocks of a few steps
    seen = list(batches(data, order, 2))
    assert [len(s) for s, _, _ in seen] == [2] * 11 + [1]
    states = torch.cat([s for s, _, _ in seen])
    assert torch.equal(states, data.states[order])
    assert torch.equal(torch.cat([p for _, p, _ in seen]), data.position[order])
    prepared = LossTargets.of(data.targets)
    assert torch.equal(torch.cat([t.index for _, _, t in seen]), prepared.index[order])


def test_small_steps_train_on_one_thread_and_restore_the_setting():
    head = make_head()
    seen = []
    before = torch.get_num_threads()
    train_lens(make_lens(LensKind.LAYER, AdapterKind.NONE), head, _split(8, 5), _split(6, 6),
               TrainConfig(batch_size=L, epochs=1), seed=0, on_epoch=lambda _: seen.append(torch.get_num_threads()))
    assert seen == [1]
    assert torch.get_num_threads() == before


@pytest.mark.parametrize(("mode", "large"), [("dense", False), ("plain", False), ("tiled", False), ("dense", True),
                                             ("tiled", True)])
def test_graph_stand_in_trains_as_the_eager_step(monkeypatch, mode, large):
    """Static buffers and replay (``graph="static"``, the CUDA graph's stand-in) train exactly as eager steps.

    The warm-up batches train as they are, full batches go through the static buffers, and the last
    partial batch of each epoch still trains (run as it is). ``large``: through the large-head path,
    whose scratch memory the replayed step shares with the partial batch's eager one.
    """
    if large:
        monkeypatch.setattr(head_module, "LARGE_HEAD_ELEMENTS", 0)
    head = make_head()
    train_split, val_split = _split(23, 1), _split(12, 2)
    config = TrainConfig(batch_size=3 * L, epochs=2, patience=2, lr=1e-2)
    results = {}
    for graph in ("off", "static"):
        lens = make_lens(LensKind.LAYER, AdapterKind.BIAS)
        outcome = train_lens(lens, head, train_split, val_split, config, seed=3, precision="fp32",
                             update=mode, graph=graph)
        results[graph] = ([e.train_loss for e in outcome.epochs], lens.state_dict())
    assert results["static"][0] == pytest.approx(results["off"][0], rel=1e-6)
    for name, value in results["off"][1].items():
        torch.testing.assert_close(results["static"][1][name], value, rtol=1e-6, atol=1e-7)


def test_graph_stand_in_replays_full_batches_and_runs_the_partial_one():
    head, lens = make_head(), make_lens(LensKind.LAYER, AdapterKind.NONE)
    data = _split(11, 4)
    step = TrainStep(lens, head, data, TrainConfig(batch_size=2 * L), precision="fp32", graph="static")
    order = torch.arange(11)
    for states, position, targets in batches(data, order, 2):  # 5 full batches, then 1 sample
        step(states, position, targets)
    assert step.graphed.replays == 5 - step.graphed.warmup
    assert train.resolve_graph_mode("auto", torch.device("cpu")) == "off"
    with pytest.raises(ValueError, match="CUDA"):
        train.resolve_graph_mode("cuda", torch.device("cpu"))


def test_evaluation_batches_grow_with_the_device_memory():
    """On CUDA, evaluation batches are sized from the free memory; on CPU they keep their bounds."""
    cpu = train.eval_batch_samples(16, 128_256, torch.device("cpu"))
    assert cpu == train.EVAL_LOGIT_ELEMENTS // (16 * 128_256)
    small_gpu = train.eval_batch_samples(16, 128_256, torch.device("cuda"), free_bytes=1 << 30)
    big_gpu = train.eval_batch_samples(16, 128_256, torch.device("cuda"), free_bytes=130 << 30)
    assert small_gpu == cpu < big_gpu
    assert big_gpu * 16 * 128_256 <= train.EVAL_MAX_LOGIT_ELEMENTS
    assert train.eval_batch_samples(16, 1_586, torch.device("cuda"), free_bytes=130 << 30) * 16 > train.EVAL_BATCH_STATES
