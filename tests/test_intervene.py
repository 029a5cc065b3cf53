"""``ctexp intervene`` on a tiny random CODI checkpoint: sites, modes, batching, statistics and bad input.

A store is extracted from the tiny LLaMA CODI model of ``tests.codi_assets`` (fp32), a lens is trained
on it for one epoch (``ctexp run``), and the intervention replays CODI's loop with one thought
replaced. The answers are checked against the plain reference loop of ``codi_assets`` where the
replacement can be built by hand.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ctexp.analysis.intervention import ProblemAnswer, adjust, paired_row
from ctexp.analysis.statistics import holm, mcnemar_p
from ctexp.data.store import Store, load_store
from ctexp.experiment.intervene import make_intervene_config, plan_intervention
from ctexp.model.answers import answered
from ctexp.model.checkpoint import resolve_files
from ctexp.model.codi import CodiModel, load_codi, load_hf_tokenizer, question_ids
from ctexp.model.intervene import Intervener, Mode, Site, SitePatch, derangement, replacement, site_positions
from ctexp.registry.locations import Locations
from tests.codi_assets import ALPHA, MAX_ANSWER, QUESTIONS, Assets, R, T, make_assets, reference_thoughts, run_extract
from tests.conftest import Cli

S = 3  # hidden states of the tiny models: embeddings, block 1, block 2 after the final norm
CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and spin-waiting threads hurt on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class Setup:
    assets: Assets
    store: Path
    cli: Cli
    run_id: str


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    """A store extracted from the tiny LLaMA, and a finished lens run on it in a fresh home."""
    root = tmp_path_factory.mktemp("intervene")
    assets = make_assets(root / "codi")
    store = run_extract(assets, assets.llama_dir, assets.llama, root / "store").path
    cli = Cli(root / "home")
    run = cli.json("run", "--store", str(store), "--epochs", "2", "--lr", "0.01")
    return Setup(assets, store, cli, run["run_id"])


def intervene(setup: Setup, *args: object, code: int = 0):
    flags = ["--run", setup.run_id, "--model", setup.assets.llama_dir, "--base", setup.assets.llama.base,
             "--lora-r", R, "--lora-alpha", ALPHA, "--max-answer-tokens", MAX_ANSWER, "--device", "cpu",
             "--dtype", "fp32", "--batch-size", 4]
    return setup.cli("intervene", *[str(a) for a in [*flags, *args]], code=code)


def intervene_json(setup: Setup, *args: object) -> dict:
    return json.loads(intervene(setup, *args, "--json", "--answers").stdout)


@pytest.fixture(scope="module")
def models(setup: Setup) -> dict[str, CodiModel]:
    """The tiny LLaMA and GPT-2 CODI models, loaded as ``ctexp intervene`` loads them (fp32)."""
    loaded = {}
    for kind, directory, codi in (("llama", setup.assets.llama_dir, setup.assets.llama),
                                  ("gpt2", setup.assets.gpt2_dir, setup.assets.gpt2)):
        files = resolve_files(directory, codi.base)
        loaded[kind] = load_codi(files, load_hf_tokenizer(files.tokenizer), CPU, torch.float32, R, ALPHA)
    return loaded


@pytest.fixture(scope="module")
def codi(models: dict[str, CodiModel]) -> CodiModel:
    return models["llama"]


def intervener(setup: Setup, codi: CodiModel, batch_size: int = 4, kind: str = "llama") -> Intervener:
    base = setup.assets.llama.base if kind == "llama" else setup.assets.gpt2.base
    tokenizer = load_hf_tokenizer(base)
    prompts = [question_ids(tokenizer, question) for question in QUESTIONS]
    return Intervener(codi, prompts, T, MAX_ANSWER, batch_size)


# --- the control and the identities -------------------------------------------------------------


def test_none_changes_nothing_at_any_position_of_either_site(setup: Setup) -> None:
    store = load_store(setup.store)
    for site in (["--site", "feedback"], ["--site", "residual", "--layer", "1"]):
        result = intervene_json(setup, "--mode", "none", "--problems", "all", *site)
        control = result["control"]["answers"]
        # The control is the extraction's own answers (same dtype and loop).
        assert [(a["problem_id"], a["correct"]) for a in control] == [(p.id, p.correct) for p in store.problems]
        assert [answered(p, a["text"]).predicted for p, a in zip(store.problems, control)] == [
            p.predicted for p in store.problems
        ]
        expected = [*range(T - 1 if site[1] == "feedback" else T), "all"]
        assert [row["position"] for row in result["rows"]] == expected
        for row in result["rows"]:
            assert row["answers"] == control
            assert (row["delta"], row["changed"], row["lost"], row["gained"], row["p_value"]) == (0, 0, 0, 0, 1)
            assert row["ci"] == [0, 0] and not row["significant"] and row["n"] == len(QUESTIONS)


def test_swap_with_itself_is_the_identity_and_the_derangement_moves_everyone(setup: Setup, codi: CodiModel) -> None:
    runner = intervener(setup, codi)
    control = runner.control(Site.FEEDBACK, None)
    identity = list(range(len(QUESTIONS)))
    values = {p: replacement(Mode.SWAP, control.recorded[:, p], permutation=identity) for p in range(T - 1)}
    assert runner.replaced(Site.FEEDBACK, None, values) == control.answers
    swapped = derangement(len(QUESTIONS), seed=3)
    assert swapped == derangement(len(QUESTIONS), seed=3) and swapped != derangement(len(QUESTIONS), seed=4)
    assert sorted(swapped) == identity and all(i != j for i, j in enumerate(swapped))
    moved = {p: replacement(Mode.SWAP, control.recorded[:, p], permutation=swapped) for p in range(T - 1)}
    assert runner.replaced(Site.FEEDBACK, None, moved) != control.answers  # the check above compares something real


@pytest.mark.parametrize("position", [0, 3])
def test_residual_at_the_last_layer_is_feedback_of_its_projection(setup: Setup, codi: CodiModel, position: int) -> None:
    """Replacing h_p after the final norm changes CODI only through prj(h_p), the feedback."""
    runner = intervener(setup, codi)
    residual = runner.control(Site.RESIDUAL, S - 1)
    swapped = derangement(len(QUESTIONS), seed=0)
    states = replacement(Mode.SWAP, residual.recorded[:, position], permutation=swapped)  # (n, d) other problems' h_p
    projected = codi.prj(states[:, None])[:, 0]  # (n, d)
    prompts = runner.prompts
    by_residual = codi.think(prompts, T, MAX_ANSWER, SitePatch(Site.RESIDUAL, S - 1, frozenset({position}),
                                                               lambda p, v: states[:, None]))
    by_feedback = codi.think(prompts, T, MAX_ANSWER, SitePatch(Site.FEEDBACK, None, frozenset({position}),
                                                               lambda p, v: projected[:, None]))
    plain = codi.think(prompts, T, MAX_ANSWER)
    torch.testing.assert_close(by_residual.hidden[:, -1, position], states)  # the recorded state is the replaced one
    torch.testing.assert_close(by_residual.hidden[:, :, position + 1 : T], by_feedback.hidden[:, :, position + 1 : T])
    assert by_residual.answers == by_feedback.answers
    assert not torch.allclose(plain.hidden[:, :, position + 1 : T], by_feedback.hidden[:, :, position + 1 : T])


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("layer", [0, 1, 2])
def test_residual_replaces_exactly_the_hidden_state_of_its_layer(
    setup: Setup, models: dict[str, CodiModel], kind: str, layer: int
) -> None:
    codi = models[kind]
    runner = intervener(setup, codi, kind=kind)
    zeros = torch.zeros(len(QUESTIONS), 1, 32)
    patch = SitePatch(Site.RESIDUAL, layer, frozenset({2}), lambda p, v: zeros)
    patched = codi.think(runner.prompts, T, MAX_ANSWER, patch)
    plain = codi.think(runner.prompts, T, MAX_ANSWER)
    assert float(patched.hidden[:, layer, 2].abs().max()) == 0.0
    torch.testing.assert_close(patched.hidden[:, :, :2], plain.hidden[:, :, :2])  # earlier steps untouched
    torch.testing.assert_close(patched.hidden[:, :layer, 2], plain.hidden[:, :layer, 2])  # and lower layers
    assert not torch.allclose(patched.hidden[:, :, 3], plain.hidden[:, :, 3])  # later steps see it
    if layer < S - 1:  # through the cache too: replaying the same feedback still gives other later states
        feedback = SitePatch(Site.FEEDBACK, None, frozenset({2}), lambda p, v: codi.prj(patched.hidden[:, -1, 2:3]))
        replayed = codi.think(runner.prompts, T, MAX_ANSWER, feedback)
        assert not torch.allclose(patched.hidden[:, :, 3], replayed.hidden[:, :, 3])


# --- decoded and target against a hand-built loop -------------------------------------------------


def lens_top1(setup: Setup, store: Store, problem: int, position: int, layer: int) -> int:
    """The lens's top-1 token by hand: h + h W_l + b_l, the final norm where the state lacks it, unembedding."""
    run_dir = setup.cli.home / "runs" / setup.run_id
    weights = load_file(str(run_dir / "lens.safetensors"))
    layers = json.loads((run_dir / "lens.json").read_text())["layers"]
    column = layers.index(layer)
    h = store.hidden[problem, layer, position].float()
    h = h + h @ weights["weight"][column] + weights["bias"][column]
    if layer not in store.meta.normed_states:
        h = h * torch.rsqrt(h.pow(2).mean() + store.meta.norm.eps) * store.norm_weight
    return int((store.unembed.float() @ h).argmax())


def test_decoded_feeds_the_embedding_of_the_lens_top1_token(setup: Setup) -> None:
    from transformers import AutoTokenizer

    position = 2
    result = intervene_json(setup, "--mode", "decoded", "--positions", position, "--problems", "all")
    row, = result["rows"]
    store = load_store(setup.store)
    run = json.loads((setup.cli.home / "runs" / setup.run_id / "result.json").read_text())
    cells = [c for c in run["by_cell"] if c["position"] == position]
    best = max(cells, key=lambda c: (c["top1"], -c["layer"]))["layer"]
    assert result["config"]["lens_layers"] == {str(position): best}
    tokenizer = AutoTokenizer.from_pretrained(str(setup.assets.llama.base))
    codi = setup.assets.llama
    embed = codi.reference.get_input_embeddings().weight.detach()
    changed = 0
    for index, problem in enumerate(store.problems):
        token = lens_top1(setup, store, index, position, best)
        _, ids = reference_thoughts(codi, tokenizer, problem.question, feedback={position: embed[token]})
        text = tokenizer.decode(ids, skip_special_tokens=True)
        assert row["answers"][index]["text"] == text, index
        changed += text != result["control"]["answers"][index]["text"]
    assert changed > 0  # the decoded token is not what CODI fed: the comparison above is a real one


def test_target_feeds_the_aligned_cot_token(setup: Setup) -> None:
    position = 1
    config = make_intervene_config(
        run=setup.run_id, model=setup.assets.llama_dir, base=setup.assets.llama.base, lora_r=R, lora_alpha=ALPHA,
        max_answer_tokens=MAX_ANSWER, dtype="fp32", modes=(Mode.TARGET,), positions=str(position), problems="all",
    )
    plan = plan_intervention(config, Locations.resolve(setup.cli.home), CPU)
    tokens = plan.tokens[Mode.TARGET][position]
    store = load_store(setup.store)
    tokenizer = load_hf_tokenizer(setup.assets.llama.base)
    for index, problem in enumerate(store.problems):  # uniform split, first target: slice [p*N//T, (p+1)*N//T)
        cot = tokenizer(" ".join(problem.steps), add_special_tokens=False)["input_ids"]
        start, stop = position * len(cot) // T, (position + 1) * len(cot) // T
        assert int(tokens[index]) == (cot[start] if stop > start else -1)
    result = plan.run()
    row, = result.rows
    assert row.n == int((tokens >= 0).sum()) and row.n > 0


# --- batching, determinism and the other modes -------------------------------------------------


def test_batched_equals_one_at_a_time_and_is_deterministic(setup: Setup) -> None:
    flags = ("--mode", "mean,zero,swap,noise", "--positions", "1,4", "--problems", "all", "--seed", 5)
    batched = intervene_json(setup, *flags)
    single = intervene_json(setup, *flags, "--batch-size", 1)
    again = intervene_json(setup, *flags)
    for other in (single, again):
        assert other["rows"] == batched["rows"] and other["control"] == batched["control"]
    assert [(r["mode"], r["position"]) for r in batched["rows"]] == [
        (mode, position) for mode in ("mean", "zero", "swap", "noise") for position in (1, 4, "all")
    ]
    assert max(row["changed"] for row in batched["rows"]) > 0
    other_seed = intervene_json(setup, *flags[:-1], 6)
    noise = [r for r in other_seed["rows"] if r["mode"] == "noise"]
    assert noise != [r for r in batched["rows"] if r["mode"] == "noise"]


def test_modes_give_the_values_they_promise(setup: Setup, codi: CodiModel) -> None:
    recorded = torch.randn(5, 32)
    torch.testing.assert_close(replacement(Mode.MEAN, recorded)[2], (recorded.sum(0) - recorded[2]) / 4)
    noise = replacement(Mode.NOISE, recorded, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(noise.norm(dim=-1), recorded.norm(dim=-1))
    assert float(replacement(Mode.ZERO, recorded).abs().max()) == 0.0
    embedding = torch.randn(10, 32)
    tokens = torch.tensor([3, -1, 0, 9, 3])
    decoded = replacement(Mode.DECODED, recorded, tokens=tokens, embedding=embedding)
    torch.testing.assert_close(decoded[[0, 2, 3, 4]], embedding[[3, 0, 9, 3]])
    torch.testing.assert_close(decoded[1], recorded[1])  # no token: the problem keeps its own value
    assert site_positions(Site.FEEDBACK, T) == [0, 1, 2, 3, 4] and site_positions(Site.RESIDUAL, T) == list(range(T))


# --- statistics on known tables -----------------------------------------------------------------


def answers(correct: list[bool], prefix: str = "") -> list[ProblemAnswer]:
    return [ProblemAnswer(problem_id=f"p{i}", text=f"{prefix}{int(c)}", parsed=str(int(c)), correct=c)
            for i, c in enumerate(correct)]


def test_statistics_on_known_tables() -> None:
    control = answers([True] * 8 + [False] * 2)
    treated = answers([False, False, False] + [True] * 5 + [True, False])  # 3 lost, 1 gained
    row = paired_row(control, treated, position=2, mode="zero", site="feedback", layer=None, seed=(0, 0))
    assert (row.n, row.lost, row.gained) == (10, 3, 1)
    assert row.accuracy == pytest.approx(0.6) and row.control_accuracy == pytest.approx(0.8)
    assert row.delta == pytest.approx(-0.2) and row.changed == pytest.approx(0.4)
    assert row.p_value == mcnemar_p(3, 1) == 0.625
    low, high = row.ci
    assert -0.6 <= low < -0.2 < high <= 0.2
    assert paired_row(control, treated, position=2, mode="zero", site="feedback", layer=None, seed=(0, 0)).ci == row.ci
    everything_lost = paired_row(answers([True] * 12), answers([False] * 12), position="all", mode="zero",
                                 site="feedback", layer=None, seed=(0, 1))
    assert everything_lost.delta == -1 and everything_lost.ci == (-1.0, -1.0)
    assert everything_lost.p_value == mcnemar_p(12, 0) == 2 / 4096
    rows = adjust([row, everything_lost])
    assert [r.p_holm for r in rows] == holm([0.625, 2 / 4096]) == [0.625, 4 / 4096]
    assert [r.significant for r in rows] == [False, True]
    with pytest.raises(ValueError, match="same problems"):
        paired_row(control, treated[::-1], position=0, mode="zero", site="feedback", layer=None, seed=(0,))


def test_bootstrap_interval_covers_the_paired_spread() -> None:
    rng = np.random.default_rng(0)
    before = rng.random(400) < 0.7
    after = before.copy()
    after[rng.choice(400, 60, replace=False)] = False
    row = paired_row(answers(before.tolist()), answers(after.tolist()), position=0, mode="noise", site="feedback",
                     layer=None, seed=(1, 2))
    low, high = row.ci
    assert low < row.delta < high < 0  # the drop is real and the interval says so
    assert high - low < 0.1


# --- the command's output and its errors -----------------------------------------------------------


def test_tables_and_json_shape(setup: Setup) -> None:
    out = intervene(setup, "--mode", "zero,swap", "--positions", "0-1").stdout
    assert out.startswith("control: ") and "zero" in out and "swap" in out and "Delta [95% CI]" in out
    result = json.loads(intervene(setup, "--mode", "zero", "--positions", "0", "--json").stdout)
    assert set(result) == {"run_id", "lens_run", "config", "control", "rows"}
    assert result["lens_run"] == setup.run_id and set(result["control"]) == {"accuracy", "n"}
    row, = result["rows"]
    assert {"position", "mode", "site", "layer", "n", "accuracy", "delta", "ci", "changed", "p_value", "p_holm",
            "significant"} <= set(row) and "answers" not in row
    test_ids = json.loads((setup.cli.home / "runs" / setup.run_id / "result.json").read_text())["data"]["test_problem_ids"]
    assert row["n"] == result["control"]["n"] == len(test_ids)  # by default the run's test problems


def test_bad_input_is_one_line_and_writes_nothing(setup: Setup, tmp_path: Path) -> None:
    before = sorted(path for path in setup.cli.home.rglob("*"))
    assets = setup.assets
    gpt2 = ["--model", assets.gpt2_dir, "--base", assets.gpt2.base]
    cases = [
        (["--run", "no-such-run"], 8, "no run matches"),
        (gpt2, 10, "was extracted from"),
        (["--model", tmp_path / "absent"], 10, "not found"),
        (["--positions", "9"], 2, "--positions"),
        (["--positions", "x"], 2, "--positions"),
        (["--mode", "zero,flip"], 2, "unknown mode 'flip'"),
        (["--positions", str(T - 1)], 2, f"position {T - 1} is the last"),
        (["--site", "residual"], 2, "needs --layer"),
        (["--site", "residual", "--layer", "1", "--mode", "decoded"], 2, "decoded and target"),
        (["--layer", "1"], 2, "--layer is for --site residual"),
        (["--site", "sideways"], 2, "site"),
        (["--answers"], 2, "--answers"),
        (["--lens-layer", "7", "--mode", "decoded"], 2, "--lens-layer 7"),
    ]
    for args, code, fragment in cases:
        result = intervene(setup, *args, code=code)
        assert fragment in result.stderr, (args, result.stderr)
    assert sorted(path for path in setup.cli.home.rglob("*")) == before
