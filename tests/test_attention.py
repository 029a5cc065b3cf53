"""Attention recording (``ctexp extract --attention``) and its report (``ctexp attention``).

Recording runs on the tiny random LLaMA and GPT-2 CODI checkpoints of ``tests.test_extract``; the
recorded weights are checked against softmax(QK^T / sqrt(d)) computed by hand from the plain reference
model's states. The report is checked on a world store whose attention file this test plants, with a
lens run whose correct and incorrect states the planting treats differently.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ctexp.analysis.attention import KIND_COLUMNS
from ctexp.data.attention import (
    Attention,
    AttentionMode,
    ContextKind,
    attention_path,
    load_attention,
    token_kind,
    write_attention,
)
from ctexp.data.sources.gsm8k import read_gsm8k
from ctexp.data.store import load_store
from ctexp.data.tokenizers import load_tokenizer
from ctexp.errors import StoreError
from ctexp.model.extraction import ExtractProgress
from ctexp.model.shards import partial_path
from tests import test_extract
from tests.codi_assets import QUESTIONS, Assets, Codi, T, reference_prj, reference_thoughts, run_extract
from tests.conftest import Cli
from tests.test_extract import Stop

# The tiny CODI checkpoints, and one torch thread while they run (fixtures of tests.test_extract).
assets = test_extract.assets
one_thread = test_extract.one_thread

# --- recording on tiny CODI checkpoints -----------------------------------------------------------


@pytest.fixture(scope="module")
def recorded(assets: Assets, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Extractions with and without attention, made once."""
    root = tmp_path_factory.mktemp("attention-stores")
    made = {}
    for kind, directory, codi in (("llama", assets.llama_dir, assets.llama), ("gpt2", assets.gpt2_dir, assets.gpt2)):
        made[f"{kind}-plain"] = run_extract(assets, directory, codi, root / f"{kind}-plain").path
        made[f"{kind}-heads"] = run_extract(assets, directory, codi, root / f"{kind}-heads", attention="heads").path
    made["llama-heads-b1"] = run_extract(
        assets, assets.llama_dir, assets.llama, root / "llama-heads-b1", attention="heads", batch_size=1
    ).path
    made["llama-mean-b5"] = run_extract(
        assets, assets.llama_dir, assets.llama, root / "llama-mean-b5", attention="mean", batch_size=5
    ).path
    return made


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def hand_attention(codi: Codi, layer: int, states: torch.Tensor) -> torch.Tensor:
    """(H, N, N) softmax(QK^T / sqrt(d)) with the causal mask, of the block that reads ``states`` (1, N, d)."""
    model, n = codi.reference, states.shape[1]
    if codi.kind == "llama":
        block = model.model.layers[layer]
        attention = block.self_attn
        x = block.input_layernorm(states)  # (1, N, d)
        head_dim = attention.head_dim
        q = attention.q_proj(x).view(n, -1, head_dim).transpose(0, 1)  # (H, N, hd)
        k = attention.k_proj(x).view(n, -1, head_dim).transpose(0, 1)  # (Hkv, N, hd)
        cos, sin = model.model.rotary_emb(x, torch.arange(n)[None])  # (1, N, hd)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)  # (H, N, hd): grouped-query heads share keys
    else:
        block = model.transformer.h[layer]
        q, k, _ = block.attn.c_attn(block.ln_1(states)).split(states.shape[-1], dim=-1)  # (1, N, d) each
        head_dim = states.shape[-1] // block.attn.num_heads
        q, k = (t.view(n, -1, head_dim).transpose(0, 1) for t in (q, k))  # (H, N, hd)
    scores = q @ k.transpose(1, 2) / math.sqrt(head_dim)  # (H, N, N)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)


@torch.no_grad()
def reference_attention(codi: Codi, tokenizer, question: str) -> torch.Tensor:
    """(L, H, T+1, N) by hand: the thoughts' rows, then bot's, over question + bot + thoughts (N slots)."""
    states, _ = reference_thoughts(codi, tokenizer, question)  # (S, T+1, d), bot last
    ids = tokenizer(question)["input_ids"] + [codi.vocab + 1]
    previous = [states[-1, T], *[states[-1, t] for t in range(T - 1)]]  # what each thought's input came from
    thoughts = torch.stack([reference_prj(codi.prj, h) for h in previous])  # (T, d)
    embeds = torch.cat([codi.reference.get_input_embeddings()(torch.tensor(ids)), thoughts])[None]  # (1, N, d)
    hidden = codi.reference(inputs_embeds=embeds, output_hidden_states=True, use_cache=False).hidden_states
    n = len(ids) - 1  # question tokens; bot is slot n
    rows = [*range(n + 1, n + 1 + T), n]
    layers = len(hidden) - 1
    return torch.stack([hand_attention(codi, layer, hidden[layer])[:, rows] for layer in range(layers)])


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_recorded_weights_are_the_hand_computed_softmax(assets: Assets, recorded: dict[str, Path], kind: str) -> None:
    from transformers import AutoTokenizer

    codi = assets.llama if kind == "llama" else assets.gpt2
    tokenizer = AutoTokenizer.from_pretrained(str(codi.base))
    store = load_store(recorded[f"{kind}-heads"])
    attention = load_attention(store)
    assert attention.mode is AttentionMode.HEADS and attention.weights.shape[:4] == (len(QUESTIONS), 2, 4, T + 1)
    for index, problem in enumerate(read_gsm8k(assets.data)):
        expected = reference_attention(codi, tokenizer, problem.question)  # (L, H, T+1, N)
        width = expected.shape[-1]
        torch.testing.assert_close(attention.weights[index, ..., :width], expected, atol=2e-6, rtol=1e-4)
        assert not attention.weights[index, ..., width:].any()  # padding
        ids = tokenizer(problem.question)["input_ids"]
        assert attention.tokens[index, : len(ids) + 1].tolist() == [*ids, codi.vocab + 1]
    sums = attention.weights.sum(dim=-1)
    torch.testing.assert_close(sums, torch.ones_like(sums))
    shared = int(attention.lengths.min())  # slots every row of every problem sees
    assert attention.weights[..., :shared].std(dim=3).mean() > 1e-3  # the rows differ: the check compares something


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_recording_leaves_the_store_unchanged(recorded: dict[str, Path], kind: str) -> None:
    plain, heads = load_store(recorded[f"{kind}-plain"]), load_store(recorded[f"{kind}-heads"])
    assert torch.equal(plain.hidden, heads.hidden) and plain.problems == heads.problems
    assert plain.meta.content_hash == heads.meta.content_hash
    assert not attention_path(recorded[f"{kind}-plain"]).exists()


def test_recording_in_bf16_leaves_the_states_unchanged(assets: Assets, tmp_path: Path) -> None:
    """Eager and sdpa attention differ most in bf16: the recorded states are still the plain extraction's."""
    runs = [
        run_extract(assets, assets.llama_dir, assets.llama, tmp_path / name, dtype="bf16", batch_size=6, **extra)
        for name, extra in (("plain", {}), ("mean", {"attention": "mean"}))
    ]
    assert runs[0].meta.content_hash == runs[1].meta.content_hash
    attention = load_attention(load_store(runs[1].path))
    assert attention.weights.dtype == torch.float32 and attention.mode is AttentionMode.MEAN


def test_batched_attention_equals_one_at_a_time_and_mean_is_the_head_mean(recorded: dict[str, Path]) -> None:
    batched = load_attention(load_store(recorded["llama-heads"]))
    single = load_attention(load_store(recorded["llama-heads-b1"]))
    mean = load_attention(load_store(recorded["llama-mean-b5"]))
    torch.testing.assert_close(batched.weights, single.weights, atol=2e-6, rtol=1e-4)
    assert torch.equal(batched.tokens, single.tokens) and torch.equal(batched.kinds, single.kinds)
    torch.testing.assert_close(mean.weights, batched.weights.mean(dim=2), atol=2e-6, rtol=1e-4)
    assert torch.equal(mean.tokens, batched.tokens)


def test_context_kinds(recorded: dict[str, Path]) -> None:
    attention = load_attention(load_store(recorded["llama-heads"]))
    kinds = attention.kinds[0].tolist()
    n = int(attention.lengths[0])
    assert kinds[0] == ContextKind.START  # LLaMA's BOS
    assert kinds[n] == ContextKind.BOT and kinds[n + 1 : n + 1 + T] == [ContextKind.THOUGHT] * T
    assert ContextKind.NUMBER in kinds[:n] and set(kinds[n + 1 + T :]) <= {ContextKind.PAD}
    assert [token_kind(t) for t in (" 48", "1,200", " *", "=", " apples", ".", "")] == [
        ContextKind.NUMBER, ContextKind.NUMBER, ContextKind.OPERATOR, ContextKind.OPERATOR,
        ContextKind.WORD, ContextKind.WORD, ContextKind.WORD,
    ]


def test_an_interrupted_attention_extraction_resumes_to_the_same_file(
    assets: Assets, recorded: dict[str, Path], tmp_path: Path
) -> None:
    settings = {"shard_size": 4, "batch_size": 3, "attention": "mean"}
    whole = run_extract(assets, assets.gpt2_dir, assets.gpt2, tmp_path / "whole", **settings)

    def stop(event: ExtractProgress) -> None:
        if event.shards_done >= 1:
            raise Stop

    out = tmp_path / "store"
    with pytest.raises(Stop):
        run_extract(assets, assets.gpt2_dir, assets.gpt2, out, progress=stop, **settings)
    resumed = run_extract(assets, assets.gpt2_dir, assets.gpt2, out, **settings)
    assert resumed.resumed == 4 and resumed.meta.content_hash == whole.meta.content_hash
    for name, tensor in load_file(str(whole.attention)).items():
        assert torch.equal(tensor, load_file(str(resumed.attention))[name]), name
    # Three shards of different widths, assembled in source order: the one-shard extraction's rows.
    sharded, single = load_attention(load_store(resumed.path)), load_attention(load_store(recorded["gpt2-heads"]))
    assert torch.equal(sharded.tokens, single.tokens) and torch.equal(sharded.kinds, single.kinds)
    torch.testing.assert_close(sharded.weights, single.weights.mean(dim=2), atol=2e-6, rtol=1e-4)
    # A partial extraction without attention is not finished with it: its shards hold none.
    with pytest.raises(Stop):
        run_extract(assets, assets.gpt2_dir, assets.gpt2, tmp_path / "other", progress=stop, shard_size=4)
    with pytest.raises(StoreError, match="other settings"):
        run_extract(assets, assets.gpt2_dir, assets.gpt2, tmp_path / "other", **settings)
    assert partial_path(tmp_path / "other").exists()


def test_cli_extract_with_attention_then_report(assets: Assets, tmp_path: Path, cli: Cli) -> None:
    out = tmp_path / "store"
    result = cli(
        "extract", "--model", str(assets.llama_dir), "--base", str(assets.llama.base), "--data",
        f"gsm8k:{assets.data}", "--out", str(out), "--lora-r", "4", "--dtype", "fp32", "--max-answer-tokens", "2",
        "--attention", "mean",
    )
    assert "attention (mean) in attention.safetensors" in result.stdout
    report = cli.json("attention", "--store", str(out))
    assert report["mode"] == "mean" and report["layers"] == [1, 2] and report["positions"] == [*range(T), "bot"]
    for row in report["kinds"]:
        assert sum(row["mass"].values()) == pytest.approx(1.0, abs=1e-5)
        assert (row["mass"]["thoughts"] == 0) == (row["position"] in (0, "bot"))
        assert row["mass"]["start"] > 0  # LLaMA's BOS
    assert [entry["position"] for entry in report["top_tokens"]] == [*range(T), "bot"]
    tables = cli("attention", "--store", str(out), "--layers", "2", "--positions", "0,bot").stdout
    assert "Attention mass by context kind" in tables and "Question tokens attended most" in tables
    assert cli("--help").stdout.count("attention") >= 1


# --- the report on planted attention --------------------------------------------------------------

# Large enough for a 4-epoch lens to decode some test states of most positions and miss others.
SMALL_STORE = ["--problems", "400", "--layers", "2", "--hidden", "32"]
MASS = {"start": 1.0, "number": 3.0, "operator": 1.0, "question": 2.0, "bot": 1.0, "thoughts": 2.0, "self": 1.0}
FOCUS = {True: 0.6, False: 0.1}  # attention on a test state's target occurrences: correct, incorrect states
ANCHOR = " How"  # bot's row puts all its other-question-token mass here


def planted_mass(layer: int, row: int) -> dict[str, float]:
    """Unnormalised mass per kind of a (layer 1..L, row) before the kinds absent from a row are dropped."""
    scale = {"number": 1 + row if row < T else 1, "question": 10 if row == T else 1, "bot": layer, "self": layer}
    return {kind: MASS[kind] * scale.get(kind, 1) for kind in KIND_COLUMNS}


def row_kinds(kinds: list[int], n: int, row: int) -> list[str | None]:
    """Each context slot's column for one row (None outside the row's context)."""
    names = {ContextKind.START: "start", ContextKind.NUMBER: "number", ContextKind.OPERATOR: "operator",
             ContextKind.WORD: "question"}
    columns: list[str | None] = []
    for slot, kind in enumerate(kinds):
        if slot < n:
            columns.append(names[ContextKind(kind)])
        elif slot == n:
            columns.append("bot")
        elif row < T and slot - n - 1 < row:
            columns.append("thoughts")
        elif row < T and slot - n - 1 == row:
            columns.append("self")
        else:
            columns.append(None)
    return columns


def plant(store_path: Path, predictions: Path | None) -> dict[tuple[int, int], dict[str, float]]:
    """Write a planted attention file for a world store; return the expected mean mass per (layer, row).

    A row spreads its kinds' masses (``planted_mass``, renormalised over the kinds it sees) evenly over their
    slots; bot's row puts all its other-question-token mass on ``ANCHOR``. With ``predictions``, the row of a
    test state whose target occurs in its question puts ``FOCUS[hit]`` on those occurrences and the rest
    by kind over its other slots (the expected masses are then those of a store planted without them).
    """
    store = load_store(store_path)
    tokenizer = load_tokenizer(store.meta.tokenizer)
    meta = store.meta
    layers = meta.n_states - 1
    prompts = [tokenizer.encode(problem.question) for problem in store.problems]
    texts = {token: tokenizer.token_str(token) for token in {t for ids in prompts for t in ids}}
    width = max(len(p) for p in prompts) + 1 + T
    hits: dict[tuple[str, int, int], bool] = {}
    targets: dict[tuple[str, int], set[str]] = {}
    for line in (predictions.read_text().splitlines() if predictions else []):
        state = json.loads(line)
        hits[(state["problem_id"], state["position"], state["layer"])] = state["hit1"]
        targets[(state["problem_id"], state["position"])] = {tokenizer.token_str(t).strip() for t in state["targets"]}
    weights = torch.zeros(meta.n_problems, layers, T + 1, width)
    tokens = torch.full((meta.n_problems, width), -1, dtype=torch.int64)
    kinds = torch.zeros((meta.n_problems, width), dtype=torch.int8)
    cells = [(layer, row) for layer in range(1, layers + 1) for row in range(T + 1)]
    expected = {cell: dict.fromkeys(KIND_COLUMNS, 0.0) for cell in cells}
    for p, (problem, ids) in enumerate(zip(store.problems, prompts, strict=True)):
        n = len(ids)
        context = [int(token_kind(texts[t])) for t in ids] + [ContextKind.BOT] + [ContextKind.THOUGHT] * T
        kinds[p, : len(context)] = torch.tensor(context, dtype=torch.int8)
        tokens[p, : n + 1] = torch.tensor([*ids, 0])
        for row in range(T + 1):
            columns = row_kinds(context, n, row)
            wanted = targets.get((problem.id, row), set())
            occurrences = [c for c in range(n) if texts[ids[c]].strip() in wanted]
            anchors = [c for c in range(n) if texts[ids[c]] == ANCHOR] if row == T else []
            assert anchors or row < T, problem.question
            for layer in range(1, layers + 1):
                hit = hits.get((problem.id, row, layer))
                focus = occurrences if hit is not None else []
                slots: dict[str, list[int]] = {}
                for slot, column in enumerate(columns):
                    if column is not None and slot not in focus:
                        slots.setdefault(column, []).append(slot)
                raw = {kind: value for kind, value in planted_mass(layer, row).items() if kind in slots}
                left = 1.0 - FOCUS[bool(hit)] if focus else 1.0
                if focus:
                    weights[p, layer - 1, row, focus] = FOCUS[bool(hit)] / len(focus)
                for kind, value in raw.items():
                    share = value / sum(raw.values())
                    expected[(layer, row)][kind] += share / meta.n_problems
                    group = anchors if row == T and kind == "question" else slots[kind]
                    weights[p, layer - 1, row, group] = left * share / len(group)
    write_attention(Attention(AttentionMode.MEAN, meta.content_hash, weights, tokens, kinds), store_path)
    return expected


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A world store, a lens run on it, and planted attention that favours correct states' targets."""
    root = tmp_path_factory.mktemp("planted")
    cli = Cli(root / "home")
    cli("world", "--out", str(root / "world"), *SMALL_STORE)
    run = cli.json("run", "--store", str(root / "world"), "--epochs", "4")
    plant(root / "world", cli.home / "runs" / run["run_id"] / "predictions.jsonl")
    cli("world", "--out", str(root / "other"), "--seed", "1", *SMALL_STORE)
    expected = plant(root / "other", None)
    cli("world", "--out", str(root / "bare"), *SMALL_STORE)
    return {"cli": cli, "root": root, "run": run["run_id"], "expected": expected}


def test_the_report_recovers_the_planted_masses(planted: dict) -> None:
    cli: Cli = planted["cli"]
    report = cli.json("attention", "--store", str(planted["root"] / "other"))
    assert report["layers"] == [1, 2] and report["heads"] is None and report["run"] is None
    assert len(report["kinds"]) == 2 * (T + 1)
    for row in report["kinds"]:
        position = T if row["position"] == "bot" else row["position"]
        expected = planted["expected"][(row["layer"], position)]
        assert row["mass"] == pytest.approx(expected, abs=1e-5), (row["layer"], row["position"])
    assert report["kinds"][0]["mass"]["operator"] == 0 and report["kinds"][0]["mass"]["thoughts"] == 0
    bot = next(entry for entry in report["top_tokens"] if entry["position"] == "bot")
    question_share = sum(planted["expected"][(layer, T)]["question"] for layer in (1, 2)) / 2
    assert bot["tokens"][0]["token"] == ANCHOR and bot["tokens"][0]["mass"] == pytest.approx(question_share, abs=1e-5)
    assert bot["tokens"][0]["problems"] == 400
    chosen = cli.json("attention", "--store", str(planted["root"] / "other"), "--layers", "2", "--positions", "1-2")
    assert [(row["layer"], row["position"]) for row in chosen["kinds"]] == [(2, 1), (2, 2)]


def test_correct_states_attend_more_to_their_targets(planted: dict) -> None:
    cli: Cli = planted["cli"]
    world = str(planted["root"] / "world")
    report = cli.json("attention", "--store", world, "--run", planted["run"], "--resamples", "400")
    assert report["run"]["id"] == planted["run"]
    rows = report["target"]
    assert [row["position"] for row in rows] == list(range(T))
    compared = [row for row in rows if row["correct_states"] and row["incorrect_states"]]
    assert len(compared) >= 3, rows
    for row in compared:  # the planted masses, and a difference whose interval is clear of 0
        assert (row["correct"], row["incorrect"]) == pytest.approx((FOCUS[True], FOCUS[False]))
        assert row["difference"] == pytest.approx(FOCUS[True] - FOCUS[False]) and row["low"] > 0, row
    assert sum(row["absent_states"] for row in rows) > 0  # targets like '+' never occur in a world question
    tables = cli("attention", "--store", str(planted["root"] / "world"), "--run", planted["run"]).stdout
    assert "correct vs incorrect" in tables


def test_the_figure(planted: dict, tmp_path: Path) -> None:
    from ctexp.analysis.attention import AttentionReport, kind_heatmap

    cli: Cli = planted["cli"]
    target = tmp_path / "attention.png"
    printed = cli("attention", "--store", str(planted["root"] / "world"), "--figure", str(target)).stdout
    assert f"wrote {target}" in printed and target.read_bytes().startswith(b"\x89PNG")
    report = AttentionReport.model_validate(cli.json("attention", "--store", str(planted["root"] / "world")))
    figure = kind_heatmap(report)
    panels = [axes for axes in figure.axes if axes.get_title().startswith("layer")]
    assert [axes.get_title() for axes in panels] == ["layer 1", "layer 2"]
    assert [t.get_text() for t in panels[0].get_xticklabels()] == list(KIND_COLUMNS)


def damage(store: Path, tmp_path: Path, change) -> Path:
    """A copy of a planted store whose attention file ``change`` alters."""
    import shutil

    copy = tmp_path / f"damaged-{len(list(tmp_path.iterdir()))}"
    shutil.copytree(store, copy)
    path = attention_path(copy)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    change(tensors, metadata)
    save_file(tensors, str(path), metadata=metadata)
    return copy


def test_bad_inputs_are_one_line_and_write_nothing(planted: dict, tmp_path: Path) -> None:
    cli: Cli = planted["cli"]
    world, figure = planted["root"] / "world", tmp_path / "figure.png"

    def attempt(store: Path, *extra: str, code: int, fragment: str) -> None:
        result = cli("attention", "--store", str(store), "--figure", str(figure), *extra, code=code)
        assert fragment in result.stderr, result.stderr
        assert not figure.exists()

    def rows_off(tensors: dict, metadata: dict) -> None:
        tensors["weights"][3, 1, 2] *= 0.5

    def nan(tensors: dict, metadata: dict) -> None:
        tensors["weights"][0, 0, 0, 0] = float("nan")

    def beyond(tensors: dict, metadata: dict) -> None:
        tensors["weights"][5, 0, 0, -1] = 0.25

    def short(tensors: dict, metadata: dict) -> None:
        tensors["weights"] = tensors["weights"][:, :1].contiguous()

    def foreign(tensors: dict, metadata: dict) -> None:
        metadata["store_hash"] = "0123456789abcdef"

    def kinds(tensors: dict, metadata: dict) -> None:
        tensors["kinds"][2, 0] = int(ContextKind.BOT)

    attempt(planted["root"] / "bare", code=3, fragment="has no attention.safetensors; record it with 'ctexp extract")
    attempt(damage(world, tmp_path, rows_off), code=3, fragment="problem 3, layer 2, position 2 sum to 0.5")
    attempt(damage(world, tmp_path, nan), code=3, fragment="NaN or infinite")
    attempt(damage(world, tmp_path, beyond), code=3, fragment="outside the row's causal context")
    attempt(damage(world, tmp_path, short), code=3, fragment="the store needs (400, 2, 7,")
    attempt(damage(world, tmp_path, foreign), code=3, fragment="belongs to store '0123456789abcdef'")
    attempt(damage(world, tmp_path, kinds), code=3, fragment="problem 2 has 2 bot slots")
    attempt(planted["root"] / "other", "--run", planted["run"], code=2, fragment="was trained on store")
    attempt(world, "--run", "no-such-run", code=8, fragment="no-such-run")
    attempt(world, "--layers", "0", code=2, fragment="layer 0 (the embeddings) has no attention")
    attempt(world, "--layers", "3", code=2, fragment="attention layers are 1-2")
    attempt(world, "--positions", "6", code=2, fragment="positions are 0-5 and bot")
    attempt(tmp_path / "absent", code=3, fragment="not found")


def test_stores_load_the_same_with_or_without_attention(planted: dict) -> None:
    with_file, without = load_store(planted["root"] / "world"), load_store(planted["root"] / "bare")
    assert with_file.meta == without.meta and torch.equal(with_file.hidden, without.hidden)
