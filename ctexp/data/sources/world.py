"""The embedded default world: synthetic GSM8K-style problems and a synthetic model with planted truth.

The world exists so that every part of ctexp can be run and tested without a checkpoint, and so that
tests can check that the pipeline recovers what was planted. Everything is deterministic from
``WorldConfig.seed``.

Problems: 1 to 5 arithmetic steps chained on the previous result, CoT in the GSM8K-Aug form
``4-1=3 3*5=15 15+2=17``, tokenized by the builtin tokenizer (numbers in groups of up to three
digits, as LLaMA-3 does).

Model: a vocabulary-sized unembedding ``U`` (rows ~ N(0, 3^2/d)), an RMSNorm with weight ``g``, and
hidden states built, for problem p, state (layer) l and position i, as::

    content(p, i) = sum_j  0.6^j * e(token_j)         tokens of slice i under the uniform split
    h = D_l( s_l * r_i * Q_i content + 0.5 * e(distractor) + noise * eps ) + beta_l

where ``e(t)`` is the unit direction that scores token t highest after the norm (``U_t * g``
normalised), ``j`` counts tokens within the slice (the first token is the strongest, so the
reference's ``first`` target is the best-planted), and:

* ``s_l`` (``truth.layer_signal``) rises linearly from 0.35 at state 0 to 1.0 at the last state;
* ``r_i`` (``truth.position_signal``) is the reference's shape: position 3 strongest, 0 weakest;
* ``Q_i`` is a random orthogonal rotation at the positions in ``truth.rotated_positions`` (1, 3, 4
  for T = 6) and the identity elsewhere: a lens shared across positions cannot undo all of them at
  once, a ``layer-position`` lens can;
* ``D_l = I + c_l M_l`` and ``beta_l`` are a per-layer basis change and offset that shrink to zero at
  the last state (``truth.layer_distortion``): the logit lens is hurt by them at early layers, a
  per-layer translator undoes them;
* the distractor is a token drawn at random from the problem's question numbers and common tokens;
* ``noise`` is isotropic Gaussian, scaled by ``WorldConfig.noise``.

The last state is passed through the final norm (as transformers does), and is listed in
``normed_states``. The ``bot`` state carries only the distractor and noise.
"""

from __future__ import annotations

import math

import torch

from ctexp.config import WorldConfig
from ctexp.data.problems import Problem
from ctexp.data.store import NormSpec, Store, StoreMeta, seal
from ctexp.data.tokenizers import load_tokenizer

_NAMES = ("Ava", "Ben", "Cleo", "Dan", "Eli", "Fay", "Gus", "Ivy", "Jon", "Kim")
_ITEMS = ("apples", "books", "coins", "eggs", "marbles", "pencils", "stickers", "tickets")
_REFERENCE_POSITION_SIGNAL = (0.35, 0.6, 0.95, 1.0, 0.55, 0.7)
_TOKEN_DECAY = 0.6
_DISTRACTOR = 0.4
_NOISE_BASE = 0.12


def position_signal(n_positions: int) -> list[float]:
    """The reference-shaped per-position signal, stretched to ``n_positions`` by linear interpolation."""
    if n_positions == len(_REFERENCE_POSITION_SIGNAL):
        return list(_REFERENCE_POSITION_SIGNAL)
    profile = torch.tensor(_REFERENCE_POSITION_SIGNAL).view(1, 1, -1)
    stretched = torch.nn.functional.interpolate(profile, size=n_positions, mode="linear", align_corners=True)
    return [round(float(v), 4) for v in stretched.view(-1)]


def rotated_positions(n_positions: int) -> list[int]:
    """Positions whose content is rotated: 1, 3 and 4 of 6, proportionally for other T."""
    if n_positions < 2:
        return []
    return sorted({min(n_positions - 1, round(p * (n_positions - 1) / 5)) for p in (1, 3, 4)})


def generate_problems(config: WorldConfig, generator: torch.Generator) -> list[Problem]:
    """GSM8K-style problems with 1 to 5 chained arithmetic steps, deterministic from the generator."""
    return [_problem(index, generator) for index in range(config.problems)]


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    return int(torch.randint(low, high + 1, (1,), generator=generator))


def _operand(generator: torch.Generator) -> int:
    # Mostly small numbers, sometimes large ones so that multi-group number tokens occur.
    return _randint(generator, 2, 99) if _randint(generator, 0, 3) else _randint(generator, 100, 2500)


def _problem(index: int, generator: torch.Generator) -> Problem:
    name = _NAMES[_randint(generator, 0, len(_NAMES) - 1)]
    item = _ITEMS[_randint(generator, 0, len(_ITEMS) - 1)]
    value = _randint(generator, 2, 999)
    sentences = [f"{name} has {value} {item}."]
    steps = []
    for _ in range(_randint(generator, 1, 5)):
        op = "+-*/"[_randint(generator, 0, 3)]
        operand = _operand(generator)
        if op == "-":
            operand = min(operand, value - 1) if value > 1 else operand
            op = "-" if value > 1 else "+"
        if op == "*":
            operand = _randint(generator, 2, 12)
        if op == "/":
            divisors = [k for k in range(2, min(value, 50) + 1) if value % k == 0]
            if not divisors:
                op = "+"
            else:
                operand = divisors[_randint(generator, 0, len(divisors) - 1)]
        result = {"+": value + operand, "-": value - operand, "*": value * operand, "/": value // max(operand, 1)}[op]
        steps.append(f"{value}{op}{operand}={result}")
        sentences.append(_sentence(name, op, operand, item))
        value = result
    sentences.append(f"How many {item} does {name} have now?")
    return Problem(id=f"world-{index}", question=" ".join(sentences), steps=steps, answer=str(value))


def _sentence(name: str, op: str, operand: int, item: str) -> str:
    return {
        "+": f"Then {name} gets {operand} more {item}.",
        "-": f"Then {name} gives away {operand} {item}.",
        "*": f"Then {name}'s pile grows {operand} times as large.",
        "/": f"Then {name} splits them into {operand} equal groups and keeps one.",
    }[op]


def _uniform_slices(n_tokens: int, n_positions: int) -> list[tuple[int, int]]:
    return [(i * n_tokens // n_positions, (i + 1) * n_tokens // n_positions) for i in range(n_positions)]


def _random_orthogonal(d: int, generator: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=generator))
    return q * torch.sign(torch.diagonal(r))  # (d, d), Haar-distributed


def build_world(config: WorldConfig) -> Store:
    """Generate the world's problems and states; returns a sealed in-memory store."""
    generator = torch.Generator().manual_seed(config.seed)
    tokenizer = load_tokenizer("builtin")
    problems = generate_problems(config, generator)
    d, n_states, T = config.hidden, config.layers + 1, config.positions

    unembed = torch.randn(tokenizer.vocab_size, d, generator=generator) * (2.0 / math.sqrt(d))  # (V, d)
    norm_weight = 1.0 + 0.1 * torch.randn(d, generator=generator)  # (d,)
    directions = torch.nn.functional.normalize(unembed * norm_weight, dim=-1)  # (V, d)

    layer_signal = [round(0.35 + 0.65 * l / max(n_states - 1, 1), 4) for l in range(n_states)]
    pos_signal = position_signal(T)
    rotated = rotated_positions(T)
    rotations = torch.eye(d).repeat(T + 1, 1, 1)  # (T+1, d, d); the bot slot is never rotated
    for position in rotated:
        rotations[position] = _random_orthogonal(d, generator)
    distortion = [round(0.8 * (1 - l / max(n_states - 1, 1)), 4) for l in range(n_states)]
    basis = torch.stack(
        [torch.eye(d) + c * torch.randn(d, d, generator=generator) / math.sqrt(d) for c in distortion]
    )  # (S, d, d)
    offsets = torch.stack([c * 2.0 * torch.randn(d, generator=generator) / math.sqrt(d) for c in distortion])  # (S, d)

    content = torch.zeros(len(problems), T + 1, d)  # (P, T+1, d); the bot slot stays empty
    distractor_ids = torch.empty(len(problems), T + 1, dtype=torch.long)
    common = [tokenizer.encode(text)[0] for text in (" ", "=", "+", "*", "0", "1", "2")]
    for p, problem in enumerate(problems):
        ids = tokenizer.encode(problem.cot_text)
        for position, (start, end) in enumerate(_uniform_slices(len(ids), T)):
            for j, token in enumerate(ids[start:end]):
                content[p, position] += (_TOKEN_DECAY**j) * directions[token]
        pool = [i for number in problem.question.split() if number.isdigit() for i in tokenizer.encode(number)] + common
        picks = torch.randint(0, len(pool), (T + 1,), generator=generator)
        distractor_ids[p] = torch.tensor(pool)[picks]

    rotated_content = torch.einsum("ptd,ted->pte", content, rotations)  # (P, T+1, d): Q_t c
    signal = torch.tensor(pos_signal + [0.0]).view(1, 1, T + 1, 1) * torch.tensor(layer_signal).view(1, n_states, 1, 1)
    noise = torch.randn(len(problems), n_states, T + 1, d, generator=generator) * (_NOISE_BASE * config.noise)
    states = signal * rotated_content.unsqueeze(1) + _DISTRACTOR * directions[distractor_ids].unsqueeze(1) + noise
    hidden = torch.einsum("pstd,sed->pste", states, basis) + offsets.view(1, n_states, 1, d)  # (P, S, T+1, d)
    last = hidden[:, -1]
    hidden[:, -1] = norm_weight * last * torch.rsqrt(last.pow(2).mean(-1, keepdim=True) + 1e-5)

    meta = StoreMeta(
        model=f"world:seed={config.seed},problems={config.problems},layers={config.layers},"
        f"hidden={d},positions={T},noise={config.noise:g}",
        n_problems=len(problems),
        n_states=n_states,
        n_positions=T,
        hidden=d,
        vocab=tokenizer.vocab_size,
        dtype="float32",
        tokenizer=tokenizer.spec,
        norm=NormSpec(kind="rmsnorm", eps=1e-5),
        normed_states=[n_states - 1],
        truth={
            "layer_signal": layer_signal,
            "position_signal": pos_signal,
            "rotated_positions": rotated,
            "layer_distortion": distortion,
            "token_decay": _TOKEN_DECAY,
            "distractor": _DISTRACTOR,
            "noise": _NOISE_BASE * config.noise,
            "split": "uniform",
        },
    )
    return seal(Store(meta, hidden.contiguous(), norm_weight, None, unembed, problems))
