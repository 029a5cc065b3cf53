"""Tiny CODI: ``ctexp codi train`` and ``ctexp codi eval`` on a very small model trained for a few steps.

The checkpoint must be one that ``ctexp extract`` reads like a real CODI checkpoint: its store's states
equal (to float32 rounding) the model's own latent loop run on weights read straight from the file;
``ctexp align`` reads the held-out problems; training is deterministic for a seed; bad input is one
line, a non-zero exit and nothing written.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import Cli

TINY = ("--hidden", "16", "--layers", "2", "--heads", "2", "--intermediate", "32", "--batch-size", "8",
        "--teacher-steps", "2", "--stage-steps", "2", "--stages", "2", "--latents", "3", "--min-steps", "1",
        "--max-steps", "3", "--warmup", "1", "--test", "4", "--validation", "3", "--threads", "1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Cli, Path]:
    root = tmp_path_factory.mktemp("tinycodi")
    cli = Cli(root / "home")
    cli("codi", "train", "--out", str(root / "model"), *TINY)
    return cli, root / "model"


def test_train_writes_codi_layout(tiny: tuple[Cli, Path]) -> None:
    _, model = tiny
    state = load_file(str(model / "model.safetensors"))
    assert {"prj.1.weight", "prj.3.weight", "prj.ln.weight"} <= set(state)
    assert all(k.startswith(("codi.", "prj.")) for k in state)
    assert state["codi.model.embed_tokens.weight"].shape == (17 + 3, 16)  # V = 17 characters and <s>, </s>
    assert json.loads((model / "config.json").read_text())["vocab_size"] == 17
    assert (model / "direct" / "model.safetensors").is_file()
    summary = json.loads((model / "tinycodi.json").read_text())
    assert summary["settings"]["latents"] == 3 and summary["direct"]["latents"] == 0
    lines = (model / "data" / "test.jsonl").read_text().splitlines()
    assert len(lines) == 3 * 4  # 4 problems of each length 1..3
    record = json.loads(lines[-1])
    assert record["cot"].count("<<") == 3 and record["cot"].rsplit("<<", 1)[-1].rstrip(">").split("=")[-1] == record["answer"]


def test_training_is_deterministic_for_a_seed_in_parallel_or_not(tiny: tuple[Cli, Path], tmp_path: Path) -> None:
    """The fixture trained the direct model in a second process (--parallel, the default); trained one after
    the other here, on as many threads, both models are the same bit for bit."""
    cli, model = tiny
    cli("codi", "train", "--out", str(tmp_path / "again"), *TINY, "--no-parallel")
    cli("codi", "train", "--out", str(tmp_path / "other"), *TINY, "--seed", "1")
    for file in ("model.safetensors", "direct/model.safetensors"):
        first, again = load_file(str(model / file)), load_file(str(tmp_path / "again" / file))
        assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    first = load_file(str(model / "model.safetensors"))
    other = load_file(str(tmp_path / "other" / "model.safetensors"))
    assert not torch.equal(first["prj.1.weight"], other["prj.1.weight"])
    assert (model / "data" / "test.jsonl").read_text() == (tmp_path / "again" / "data" / "test.jsonl").read_text()


def own_latent_loop(model: Path, question: str, latents: int) -> torch.Tensor:
    """(S, T, d) states of the latent loop, on weights read straight from model.safetensors (not extract's loader)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ctexp.model.codi import CodiModel, Projection
    from ctexp.tinycodi.vocab import EOS_ID, VOCAB, question_ids

    state = load_file(str(model / "model.safetensors"))
    config = LlamaConfig.from_pretrained(model)
    config.vocab_size = VOCAB + 3
    lm = LlamaForCausalLM(config).eval()
    lm.load_state_dict({k.removeprefix("codi."): v for k, v in state.items() if k.startswith("codi.")})
    prj = Projection(config.hidden_size, state["prj.1.weight"].shape[0], layer_norm=True).eval()
    names = {"1": "up", "3": "down", "ln": "ln"}
    prj.load_state_dict({f"{names[k.split('.')[1]]}.{k.split('.')[2]}": v for k, v in state.items()
                         if k.startswith("prj.")})
    codi = CodiModel(lm, prj, VOCAB, frozenset({EOS_ID}))
    with torch.no_grad():
        loop = codi.latents([question_ids(question)], latents)
    return torch.stack(loop.latent, dim=2)[0]  # (S, T, d)


def test_checkpoint_round_trips_through_extract(tiny: tuple[Cli, Path], tmp_path: Path) -> None:
    cli, model = tiny
    from ctexp.data.store import load_store

    store_dir = tmp_path / "store"
    cli("extract", "--model", str(model), "--data", f"aug:{model / 'data' / 'validation.jsonl'}", "--dtype", "fp32",
        "--device", "cpu", "--batch-size", "4", "--out", str(store_dir))
    store = load_store(store_dir)
    assert store.meta.n_positions == 3  # no --positions: T as the checkpoint's config.json records it and store.meta.vocab == 17
    assert store.meta.tokenizer == f"hf:{model.resolve()}"
    for index, problem in enumerate(store.problems):
        expected = own_latent_loop(model, problem.question, 3)  # (S, T, d)
        assert torch.allclose(store.hidden[index, :, :3].float(), expected, atol=1e-5), problem.id


def test_a_checkpoint_recording_a_bad_num_latent_is_refused_before_extracting(tiny: tuple[Cli, Path],
                                                                             tmp_path: Path) -> None:
    cli, model = tiny
    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "num_latent": "four"}))
    result = cli("extract", "--model", str(copy), "--data", f"aug:{copy / 'data' / 'validation.jsonl'}",
                 "--device", "cpu", "--out", str(tmp_path / "store"), code=10)
    assert "num_latent must be a positive integer" in result.output and "--positions" in result.output
    assert not (tmp_path / "store").exists()


def test_eval_json_by_steps(tiny: tuple[Cli, Path]) -> None:
    cli, model = tiny
    report = cli.json("codi", "eval", "--model", str(model))
    assert [row["steps"] for row in report["by_steps"]] == [1, 2, 3]
    for row in report["by_steps"]:
        assert row["n"] == 4
        for reader in ("latent", "direct", "teacher"):
            low, high = row[reader]["ci"]
            assert 0 <= low <= row[reader]["accuracy"] <= high <= 1
    table = cli("codi", "eval", "--model", str(model), "--limit", "2").stdout
    assert "Latent (T=3)" in table and "Direct (0 latents)" in table


def test_align_reads_the_held_out_problems(tiny: tuple[Cli, Path]) -> None:
    cli, model = tiny
    out = cli("align", "--source", f"aug:{model / 'data' / 'test.jsonl'}", "--tokenizer", f"hf:{model}",
              "--positions", "3", "--split", "uniform", "--format", "jsonl", "--limit", "12").stdout
    rows = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert len(rows) == 12
    for row in rows:
        assert len(row["token_ids"]) == len(" ".join(row["steps"]))  # one token per character


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--min-steps", "3", "--max-steps", "2"), "--min-steps 3 exceeds --max-steps 2"),
        (("--hidden", "10", "--heads", "4"), "not a multiple of --heads"),
        (("--latents", "0"), "--latents"),
        (("--threads", "0"), "--threads"),
        (("--task", "hops", "--max-steps", "8"), "--max-steps 8: a hops chain of 8 nodes has at most 7 hops"),
        (("--task", "sums"), "--task"),
        (("--min-steps", "1"), "mod10v has only 210 distinct 1-step questions"),
        (("--prj-gain", "0"), "--prj-gain"),
        (("--latent-forcing", "1.5"), "--latent-forcing"),
        (("--thought-isolation", "-0.1"), "--thought-isolation"),
    ],
)
def test_bad_settings_write_nothing(cli: Cli, tmp_path: Path, flags: tuple[str, ...], message: str) -> None:
    result = cli("codi", "train", "--out", str(tmp_path / "m"), *flags, code=2)
    assert message in result.output
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.partial").exists()


@pytest.mark.parametrize("n_steps", [1, 4, 7])
def test_a_hops_problem_follows_its_facts_from_the_start(n_steps: int) -> None:
    """The CoT steps are the facts met hopping from the start; the chain has no cycle, every node is a
    distinct digit, and the start leaves room for every hop."""
    import random

    from ctexp.tinycodi.task import CHAIN, Task, sample_problem

    rng = random.Random(n_steps)
    for _ in range(200):
        problem = sample_problem(rng, n_steps, Task.HOPS)
        *facts, start = problem.question.split(" ")
        points_to = dict(fact.split("=") for fact in facts)
        assert len(facts) == CHAIN - 1 and len(set(points_to) | set(points_to.values())) == CHAIN
        node, hops = start, []
        for _ in range(n_steps):
            hops.append(f"{node}={points_to[node]}")
            node = points_to[node]
        assert problem.steps == hops and problem.answer == node != start


def test_a_hops_checkpoint_round_trips_and_aligns(cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "hops"
    cli("codi", "train", "--out", str(out), *TINY, "--task", "hops")
    assert json.loads((out / "tinycodi.json").read_text())["settings"]["task"] == "hops"
    question = json.loads((out / "data" / "test.jsonl").read_text().splitlines()[0])["question"]
    assert question.count("=") == 7
    by_steps = cli.json("codi", "eval", "--model", str(out))["by_steps"]
    assert [row["steps"] for row in by_steps] == [1, 2, 3] and all(row["n"] == 4 for row in by_steps)
    aligned = cli("align", "--source", f"aug:{out}/data/test.jsonl", "--tokenizer", f"hf:{out}", "--positions", "3",
                  "--format", "jsonl").stdout
    rows = [json.loads(line) for line in aligned.splitlines() if line.strip()]
    assert len(rows) == 12 and all(len(row["token_ids"]) == len(" ".join(row["steps"])) for row in rows)


def test_latent_forcing_decays_from_the_first_stage_to_the_last() -> None:
    from ctexp.tinycodi.settings import TinyCodiSettings

    settings = TinyCodiSettings(teacher_steps=100, stages=4, stage_steps=250, latent_forcing=0.8)
    weights = [settings.forcing(step) for step in range(settings.total_steps)]
    assert weights[99] == 0.8 and weights[100] == 0.8 and weights[100 + 3 * 250] == 0.0 == weights[-1]
    assert weights[100 + 375] == pytest.approx(0.4)
    assert all(a >= b for a, b in itertools.pairwise(weights[100:]))
    assert TinyCodiSettings().forcing(500) == 0.0  # off by default: plain CODI


def test_full_forcing_feeds_each_steps_value_embedding_at_the_thoughts_norm() -> None:
    """At weight 1 the thought fed after latent p is the input embedding of step p's value, at prj's norm."""
    from ctexp.model.codi import CodiModel
    from ctexp.tinycodi.objective import value_forcing
    from ctexp.tinycodi.settings import TinyCodiSettings
    from ctexp.tinycodi.task import make_problem
    from ctexp.tinycodi.train import new_model
    from ctexp.tinycodi.vocab import encode, question_ids

    model: CodiModel = new_model(TinyCodiSettings(hidden=16, heads=2, intermediate=32, layers=2), seed=0)
    problems = [make_problem(2, ["*3", "-2", "+5"]), make_problem(7, ["+1", "*9"])]  # values 6 4 9 and 8 2
    prompts = [question_ids(p.question) for p in problems]
    assert value_forcing(model, problems, 3, 3, 0.0) is None
    with torch.no_grad():
        plain = model.latents(prompts, 3)
        forced = model.latents(prompts, 3, value_forcing(model, problems, 3, 3, 1.0))
        embed = model.lm.get_input_embeddings().weight
        assert torch.equal(forced.inputs[0], plain.inputs[0])  # prj(bot state): nothing is forced before latent 0
        for position, values in ((0, "68"), (1, "42")):  # the second problem's value stays 2 past its last step
            fed = forced.inputs[position + 1][:, 0]  # (B, d)
            wanted = embed[[encode(value)[0] for value in values]]  # (B, d)
            cosine = torch.nn.functional.cosine_similarity(fed, wanted, dim=-1)
            assert torch.allclose(cosine, torch.ones(2), atol=1e-5)
        assert not torch.equal(forced.latent[1], plain.latent[1])
    # Two thoughts a step: only the second of each pair ends a step, and only it is forced (to that step's value).
    paired = value_forcing(model, problems, 2, 4, 1.0)
    assert paired is not None and [value is None for value in paired.values] == [True, False, True]
    assert torch.equal(paired.values[1], value_forcing(model, problems, 3, 3, 1.0).values[0])


def test_latent_forcing_changes_the_student_and_not_the_direct_model(cli: Cli, tmp_path: Path) -> None:
    """With 3 stages the second runs 2 latents while forcing is at half weight (TINY's 2 stages never force)."""
    for name, forcing in (("plain", "0"), ("forced", "1")):
        cli("codi", "train", "--out", str(tmp_path / name), *TINY, "--stages", "3", "--latent-forcing", forcing)
    assert json.loads((tmp_path / "forced" / "tinycodi.json").read_text())["settings"]["latent_forcing"] == 1.0
    for file, same in (("model.safetensors", False), ("direct/model.safetensors", True)):
        plain, forced = (load_file(str(tmp_path / name / file)) for name in ("plain", "forced"))
        assert all(torch.equal(plain[k], forced[k]) for k in plain) is same


def test_an_isolated_thought_sees_only_the_question_bot_and_itself() -> None:
    """Each isolated latent step's state equals one full pass in which the earlier thoughts are masked out, and
    what follows the loop sees only the last thought; rows not isolated run CODI's loop as it is."""
    from ctexp.model.codi import CodiModel
    from ctexp.tinycodi.settings import TinyCodiSettings
    from ctexp.tinycodi.task import make_problem
    from ctexp.tinycodi.train import new_model
    from ctexp.tinycodi.vocab import question_ids

    model: CodiModel = new_model(TinyCodiSettings(hidden=16, heads=2, intermediate=32, layers=2), seed=0)
    model.lm.eval()
    problems = [make_problem(2, ["*3", "-2", "+5"]), make_problem(7, ["+1", "*9", "-4"])]
    prompts = [question_ids(p.question) for p in problems]
    isolated = torch.tensor([True, False])
    with torch.no_grad():
        plain = model.latents(prompts, 3)
        loop = model.latents(prompts, 3, isolated=isolated)
        assert torch.equal(loop.latent[0], plain.latent[0])  # nothing earlier to hide from the first thought
        n = loop.ids.shape[1]
        embeds = torch.cat([model.lm.get_input_embeddings()(loop.ids), *loop.inputs], dim=1)  # (B, n + 3, d)
        positions = torch.cat([loop.positions, loop.positions[:, -1:] + torch.arange(1, 4)], dim=1)
        for step in range(1, 3):
            mask = torch.cat([loop.mask[:, :n], torch.ones(2, step + 1, dtype=torch.long)], dim=1)
            mask[0, n : n + step] = 0  # row 0 is isolated: its earlier thoughts are hidden
            out = model.lm(inputs_embeds=embeds[:, : n + step + 1], attention_mask=mask,
                           position_ids=positions[:, : n + step + 1], output_hidden_states=True)
            last = torch.stack([h[:, -1] for h in out.hidden_states], dim=1)  # (B, S, d)
            assert torch.allclose(loop.latent[step], last, atol=1e-5)
            assert not torch.allclose(loop.latent[step][0], plain.latent[step][0], atol=1e-3)
        assert torch.allclose(loop.latent[2][1], plain.latent[2][1], atol=1e-6)  # row 1 is CODI as it is
        assert loop.mask[0, n:].tolist() == [0, 0, 1] and loop.mask[1, n:].tolist() == [1, 1, 1]


def test_thought_isolation_decays_like_forcing_and_changes_only_the_student(cli: Cli, tmp_path: Path) -> None:
    from ctexp.tinycodi.settings import TinyCodiSettings

    settings = TinyCodiSettings(teacher_steps=100, stages=4, stage_steps=250, thought_isolation=0.5)
    assert settings.isolation(100) == 0.5 and settings.isolation(475) == pytest.approx(0.25)
    assert settings.isolation(850) == 0.0 and TinyCodiSettings().isolation(500) == 0.0
    for name, isolation in (("plain", "0"), ("isolated", "1")):
        cli("codi", "train", "--out", str(tmp_path / name), *TINY, "--stages", "3", "--thought-isolation", isolation)
    summary = json.loads((tmp_path / "isolated" / "tinycodi.json").read_text())
    assert summary["settings"]["thought_isolation"] == 1.0
    for file, same in (("model.safetensors", False), ("direct/model.safetensors", True)):
        plain, isolated = (load_file(str(tmp_path / name / file)) for name in ("plain", "isolated"))
        assert all(torch.equal(plain[k], isolated[k]) for k in plain) is same


def test_a_diverging_training_stops_both_processes_and_writes_nothing(cli: Cli, tmp_path: Path) -> None:
    result = cli("codi", "train", "--out", str(tmp_path / "m"), *TINY, "--lr", "1e9", code=11)
    assert "non-finite" in result.output and "lower --lr" in result.output
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.partial").exists()


def test_the_direct_models_process_reports_its_error() -> None:
    """An error in the second process (here the direct model diverging) reaches the caller as its own type."""
    from ctexp.errors import TrainingDiverged
    from ctexp.tinycodi.pair import DirectInSubprocess
    from ctexp.tinycodi.settings import TinyCodiSettings

    settings = TinyCodiSettings(hidden=16, layers=1, heads=2, intermediate=32, batch_size=4, teacher_steps=2,
                                stage_steps=2, stages=1, min_steps=2, max_steps=2, lr=1e9, warmup=1)
    seen: list[object] = []
    with DirectInSubprocess(settings, set(), threads=1) as other, pytest.raises(TrainingDiverged, match="direct"):
        other.result(seen.append)
    assert seen and all(step.model == "direct" for step in seen)


def test_a_direct_model_that_finishes_first_is_kept() -> None:
    """The child's final message can arrive while the latent model still trains (its progress callback
    drains the queue): it is kept for ``result``, not dropped."""
    from ctexp.tinycodi.pair import DirectInSubprocess
    from ctexp.tinycodi.settings import TinyCodiSettings
    from ctexp.tinycodi.train import Progress

    settings = TinyCodiSettings(hidden=16, layers=1, heads=2, intermediate=32, batch_size=4, teacher_steps=2,
                                stage_steps=2, stages=1, min_steps=2, max_steps=2, warmup=1)
    seen: list[Progress] = []
    with DirectInSubprocess(settings, set(), threads=1) as other:
        relay = other.relay(seen.append)
        assert relay is not None
        deadline = time.monotonic() + 120
        while not any(step.model == "direct" and step.step == settings.total_steps for step in seen):
            assert time.monotonic() < deadline, "the direct model never finished"
            relay(Progress("latent", 1, settings.total_steps, 0, 1.0, 0.0, 0.0))
            time.sleep(0.2)
        time.sleep(1)
        relay(Progress("latent", 2, settings.total_steps, 0, 1.0, 0.0, 0.0))  # reads the final message
        direct = other.result(None)
    assert direct.latents == 0 and len(direct.history) >= 1


def _children(pid: int) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(stat.parent.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads child processes from /proc")
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_ends_the_training_and_its_second_process(tmp_path: Path, sig: int, code: int) -> None:
    env = {**os.environ, "CTEXP_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "ctexp.cli", "codi", "train", "--out", str(tmp_path / "m"),
                                *TINY, "--stage-steps", "100000"], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not _children(process.pid) and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        time.sleep(0.2)
    children = _children(process.pid)
    assert children, "the direct model's process never started"
    time.sleep(3)  # both models training
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr
    assert "Traceback" not in stderr
    time.sleep(0.5)
    assert not [pid for pid in children if Path(f"/proc/{pid}").exists()
                and "Z" not in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]]
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.partial").exists()


def test_existing_out_is_refused_and_kept(tiny: tuple[Cli, Path]) -> None:
    cli, model = tiny
    before = (model / "model.safetensors").read_bytes()
    result = cli("codi", "train", "--out", str(model), *TINY, code=2)
    assert "exists; pass --force" in result.output
    assert (model / "model.safetensors").read_bytes() == before


def test_eval_refuses_a_directory_that_is_not_tiny_codi(cli: Cli, tmp_path: Path) -> None:
    result = cli("codi", "eval", "--model", str(tmp_path), code=10)
    assert "ctexp codi train" in result.output
    cli("codi", "eval", "--model", str(tmp_path), "--split", "train", code=2)


def test_training_is_recorded_like_every_run(tiny: tuple[Cli, Path]) -> None:
    cli, model = tiny
    runs = [run for run in cli.json("runs", "--kind", "tinycodi") if run["store_path"] == str(model)]
    assert len(runs) == 1
    run = runs[0]
    assert (run["status"], run["experiment"], run["lens"]) == ("FINISHED", "tinycodi", "-")
    training = run["config"]["training"]
    assert training["out"] == str(model) and training["direct"]["latents"] == 0
    result = json.loads((cli.home / "runs" / run["id"] / "result.json").read_text())
    assert result["settings"]["latents"] == 3
    report = cli("report", run["id"], code=2)
    assert "ctexp codi eval --model" in report.output


@pytest.mark.parametrize("n_steps", [1, 3, 4])
def test_a_mod10v_problem_applies_its_operations_left_to_right(n_steps: int) -> None:
    """The question is the start and then the operations, no spaces; each CoT step is one value."""
    import random
    import re

    from ctexp.tinycodi.task import Task, apply, sample_problem

    rng = random.Random(n_steps)
    for _ in range(100):
        problem = sample_problem(rng, n_steps, Task.MOD10V)
        start, *operations = re.findall(r"^\d|[-+*]\d", problem.question)
        assert "".join([start, *operations]) == problem.question and len(operations) == n_steps
        values = list(itertools.accumulate(operations, apply, initial=int(start)))[1:]
        assert problem.steps == [str(v) for v in values] and problem.answer == problem.steps[-1]


def test_reembedding_compares_prj_of_each_cot_state_with_the_next_tokens_embedding() -> None:
    """The batched loss equals the one computed problem by problem, unpadded, from bot (whose next token is eot)
    to the last CoT token: 1 - cosine plus the squared log of the norms' ratio."""
    from torch.nn import functional

    from ctexp.model.codi import CodiModel
    from ctexp.tinycodi.objective import continuation, teacher_loss
    from ctexp.tinycodi.settings import TinyCodiSettings
    from ctexp.tinycodi.task import Task, make_problem, sample_problem
    from ctexp.tinycodi.train import new_model
    from ctexp.tinycodi.vocab import question_ids

    model: CodiModel = new_model(TinyCodiSettings(hidden=16, heads=2, intermediate=32, layers=2), seed=0)
    model.lm.eval()
    problems = [make_problem(2, ["*3", "-2", "+5"]), sample_problem(__import__("random").Random(0), 2, Task.MOD10V)]
    terms = []
    with torch.no_grad():
        batched = teacher_loss(model, problems, reembed=True).reembedding
        assert teacher_loss(model, problems).reembedding is None
        for problem in problems:
            prefix = [*question_ids(problem.question), model.bot_id, model.eot_id]
            ids = torch.tensor([[*prefix, *continuation(problem, 0)]])
            last = model.lm(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]  # (m, d)
            for t in range(len(prefix) - 2, ids.shape[1] - 1):
                z = model.prj(last[t])
                e = model.lm.get_input_embeddings().weight[ids[0, t + 1]]
                terms.append(1 - functional.cosine_similarity(z, e, dim=0) + (z.norm() / e.norm()).log() ** 2)
    assert batched is not None and torch.allclose(batched, torch.stack(terms).mean(), atol=1e-5)


def test_reembedding_and_prj_gain_reach_the_checkpoint(cli: Cli, tmp_path: Path) -> None:
    """Both models train with the same objective, so re-embedding changes both; prj's gain starts where asked."""
    plain_codi = ("--reembed-weight", "0", "--prj-gain", "1")
    for name, flags in (("plain", plain_codi), ("reembed", ("--reembed-weight", "1", "--prj-gain", "0.02"))):
        cli("codi", "train", "--out", str(tmp_path / name), *TINY, "--task", "mod10v", *flags)
    summary = json.loads((tmp_path / "reembed" / "tinycodi.json").read_text())
    assert summary["settings"]["reembed_weight"] == 1.0 and summary["settings"]["prj_gain"] == 0.02
    assert all(point["reembed"] > 0 for point in summary["latent"]["history"])
    for file in ("model.safetensors", "direct/model.safetensors"):
        plain, reembedded = (load_file(str(tmp_path / name / file)) for name in ("plain", "reembed"))
        assert not all(torch.equal(plain[k], reembedded[k]) for k in plain)
    gain = load_file(str(tmp_path / "reembed" / "model.safetensors"))["prj.ln.weight"]
    assert gain.sub(0.02).abs().max() < 0.02  # a few steps of lr 1e-3 from 0.02 (nn.LayerNorm's init is 1)
