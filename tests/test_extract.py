"""Real extraction (``ctexp extract``) and ``ctexp import`` on tiny random LLaMA and GPT-2 CODI models.

Each model is saved in CODI's checkpoint layout (PEFT LoRA keys, prj) in a temporary directory; the
extracted states are checked against a separate, deliberately plain implementation: the merged model
run on the whole sequence at every step, one problem at a time, with no cache, mask or padding.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import typer
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from ctexp.cli import app as ctexp_app
from ctexp.data.problems import Problem
from ctexp.data.sources.gsm8k import read_gsm8k
from ctexp.data.sources.imports import ImportSpec, import_store
from ctexp.data.sources.spec import read_problems
from ctexp.data.store import content_hash, head_tensors, load_store
from ctexp.errors import StoreError
from ctexp.model.answers import answered, answers_match, parse_answer
from ctexp.model.extraction import ExtractProgress
from ctexp.model.shards import partial_path
from tests.codi_assets import (
    ALPHA,
    MAX_ANSWER,
    PREFIX,
    QUESTIONS,
    Assets,
    R,
    T,
    make_assets,
    reference_thoughts,
    run_extract,
    save_checkpoint,
)
from tests.conftest import assert_one_line_error, write_hf_dataset

# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and spin-waiting threads hurt on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Assets:
    return make_assets(tmp_path_factory.mktemp("codi"))


@pytest.fixture(scope="module")
def stores(assets: Assets, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Extractions shared by several tests, made once."""
    root = tmp_path_factory.mktemp("stores")
    made = {}
    made["llama"] = run_extract(assets, assets.llama_dir, assets.llama, root / "llama").path
    made["llama-b1"] = run_extract(assets, assets.llama_dir, assets.llama, root / "llama-b1", batch_size=1).path
    made["gpt2"] = run_extract(assets, assets.gpt2_dir, assets.gpt2, root / "gpt2", batch_size=5).path
    return made



# --- states and answers ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_every_state_matches_the_plain_computation(assets: Assets, stores: dict[str, Path], kind: str) -> None:
    from transformers import AutoTokenizer

    codi = assets.llama if kind == "llama" else assets.gpt2
    store = load_store(stores[kind])
    tokenizer = AutoTokenizer.from_pretrained(str(codi.base))
    assert store.hidden.shape == (len(QUESTIONS), 3, T + 1, 32)
    for index, problem in enumerate(read_gsm8k(assets.data)):
        expected, answer = reference_thoughts(codi, tokenizer, problem.question)
        torch.testing.assert_close(store.hidden[index], expected, atol=2e-5, rtol=1e-4)
        assert store.problems[index] == answered(problem, tokenizer.decode(answer, skip_special_tokens=True))
    # The states differ across positions and layers: the check above compares something real.
    assert store.hidden[:, :, :T].std(dim=2).min() > 1e-3


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_store_meta_and_head(assets: Assets, stores: dict[str, Path], kind: str) -> None:
    codi = assets.llama if kind == "llama" else assets.gpt2
    store = load_store(stores[kind])
    meta = store.meta
    checkpoint = "model.safetensors" if kind == "llama" else "pytorch_model.bin"
    assert meta.model == str((assets.llama_dir if kind == "llama" else assets.gpt2_dir).resolve() / checkpoint)
    assert (meta.n_states, meta.n_positions, meta.hidden, meta.vocab) == (3, T, 32, codi.vocab)
    assert meta.dtype == "float32" and meta.normed_states == [2]
    assert meta.tokenizer == f"hf:{codi.base.resolve()}"
    reference = codi.reference
    torch.testing.assert_close(store.unembed, reference.get_output_embeddings().weight[: codi.vocab].detach())
    if kind == "llama":
        assert meta.norm.kind == "rmsnorm" and store.norm_bias is None
        torch.testing.assert_close(store.norm_weight, reference.model.norm.weight.detach())
    else:
        assert meta.norm.kind == "layernorm"
        torch.testing.assert_close(store.norm_bias, reference.transformer.ln_f.bias.detach())
    assert not partial_path(stores[kind]).exists()
    assert all(problem.predicted is not None and problem.correct is not None for problem in store.problems)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| relative to the size of each state (its largest entry in b)."""
    return (a.float() - b.float()).abs() / b.float().abs().amax(dim=-1, keepdim=True)


def test_batched_extraction_equals_one_at_a_time_fp32(stores: dict[str, Path]) -> None:
    batched, single = load_store(stores["llama"]), load_store(stores["llama-b1"])
    assert float(relative_error(batched.hidden, single.hidden).max()) < 2e-5
    assert batched.problems == single.problems


def test_batched_extraction_equals_one_at_a_time_bf16(assets: Assets, stores: dict[str, Path], tmp_path: Path) -> None:
    """In bf16 the six-step loop amplifies rounding, so batching must stay within bf16's own error."""
    runs = [
        run_extract(assets, assets.llama_dir, assets.llama, tmp_path / f"b{b}", dtype="bf16", batch_size=b)
        for b in (1, 6)
    ]
    single, batched = (load_store(run.path) for run in runs)
    assert batched.meta.dtype == "bfloat16" and batched.unembed.dtype == torch.bfloat16
    exact = load_store(stores["llama"]).hidden  # fp32
    batching, rounding = relative_error(batched.hidden, single.hidden), relative_error(single.hidden, exact)
    assert float(rounding.mean()) < 0.02, float(rounding.mean())
    assert float(batching.mean()) <= 1.5 * float(rounding.mean()), (float(batching.mean()), float(rounding.mean()))
    assert float(batching.max()) <= 1.5 * float(rounding.max()), (float(batching.max()), float(rounding.max()))
    bot = batching[:, :, T]  # before the loop, batching changes (almost) nothing
    assert float(bot.mean()) < 0.002


def test_both_checkpoint_kinds_give_the_same_store(assets: Assets, stores: dict[str, Path], tmp_path: Path) -> None:
    from_bin = run_extract(assets, assets.llama_bin, assets.llama, tmp_path / "from-bin")
    assert from_bin.meta.content_hash == load_store(stores["llama"]).meta.content_hash
    assert from_bin.meta.model.endswith("pytorch_model.bin")


def test_stored_hash_is_the_store_modules_hash(stores: dict[str, Path]) -> None:
    """The streamed writer hashes byte for byte as ctexp.data.store does."""
    store = load_store(stores["gpt2"])
    assert store.meta.content_hash == content_hash(store.hidden, head_tensors(store), store.problems)


# --- resumption -----------------------------------------------------------------------------------


class Stop(Exception):
    pass


def test_an_interrupted_extraction_resumes_to_the_same_store(assets: Assets, tmp_path: Path) -> None:
    settings = {"shard_size": 4, "batch_size": 3}
    whole = run_extract(assets, assets.llama_dir, assets.llama, tmp_path / "whole", **settings)

    def stop_after_first_shard(event: ExtractProgress) -> None:
        if event.shards_done >= 1:
            raise Stop

    out = tmp_path / "store"
    with pytest.raises(Stop):
        run_extract(assets, assets.llama_dir, assets.llama, out, progress=stop_after_first_shard, **settings)
    assert not out.exists()
    manifest = json.loads((partial_path(out) / "manifest.json").read_text())
    assert [record["index"] for record in manifest["finished"]] == [0]

    events: list[ExtractProgress] = []
    resumed = run_extract(assets, assets.llama_dir, assets.llama, out, progress=events.append, **settings)
    assert resumed.resumed == 4 and events[0].done == 4 and events[-1].done == len(QUESTIONS)
    assert (events[0].shards_done, events[0].shards_total) == (1, 3)
    assert resumed.meta.content_hash == whole.meta.content_hash
    assert not partial_path(out).exists()


def test_a_partial_extraction_with_other_settings_is_not_mixed_in(assets: Assets, tmp_path: Path) -> None:
    out = tmp_path / "store"

    def stop(event: ExtractProgress) -> None:
        if event.shards_done >= 1:
            raise Stop

    with pytest.raises(Stop):
        run_extract(assets, assets.llama_dir, assets.llama, out, progress=stop, shard_size=4)
    with pytest.raises(StoreError, match="other settings"):
        run_extract(assets, assets.llama_dir, assets.llama, out, shard_size=4, positions=3)


# --- answers --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("The answer is: 18", "18"),
        ("The answer is: 1,200 dollars", "1200"),
        ("so 3 then 4.5", "4.5"),
        ("The answer is: -7. Then 9", "-7"),
        ("no number", None),
        ("", None),
    ],
)
def test_parse_answer(text: str, number: str | None) -> None:
    assert parse_answer(text) == number


def test_answers_match_numerically() -> None:
    assert answers_match("18.0", "18") and answers_match("1200", "1,200")
    assert not answers_match("17", "18") and not answers_match(None, "18")
    problem = Problem(id="p", question="q", steps=[], answer="72")
    assert answered(problem, "The answer is: 72").correct is True
    assert answered(problem, "I do not know") == problem.model_copy(
        update={"predicted": "I do not know", "correct": False}
    )


# --- sources --------------------------------------------------------------------------------------


def test_hf_datasets_directory_reads_like_the_jsonl(assets: Assets, tmp_path: Path) -> None:
    rows = [json.loads(line) for line in assets.data.read_text().splitlines()]
    directory = write_hf_dataset(tmp_path / "train", rows)
    assert read_problems(f"hf:{directory}") == read_gsm8k(assets.data)
    assert read_problems(f"hf:{directory}", limit=2) == read_gsm8k(assets.data, limit=2)
    (tmp_path / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    with pytest.raises(Exception, match="pass one split's directory"):
        read_problems(f"hf:{tmp_path}")


# --- the CLI --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def extract_app() -> typer.Typer:
    """The ctexp app, whose data commands include extract and import."""
    return ctexp_app


def invoke(app: typer.Typer, *args: str):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def invoke_extract(app: typer.Typer, model: Path, base: Path, out: Path, *extra: object, data: str):
    """``ctexp extract`` with the flags every test gives (LoRA rank R), then ``extra``."""
    return invoke(app, "extract", "--model", model, "--base", base, "--data", data, "--out", out, "--lora-r", R, *extra)


def test_cli_extract_then_run(assets: Assets, extract_app: typer.Typer, tmp_path: Path) -> None:
    out = tmp_path / "store"
    result = invoke_extract(
        extract_app, assets.llama_dir, assets.llama.base, out,
        "--lora-alpha", ALPHA, "--max-answer-tokens", 3, "--batch-size", 5, "--device", "cpu",
        data=f"gsm8k:{assets.data}",
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"wrote {out}: 12 problems") and "bfloat16" in result.stdout
    assert load_store(out).meta.dtype == "bfloat16"
    run = CliRunner().invoke(
        ctexp_app,
        [
            "run",
            "--store",
            str(out),
            "--epochs",
            "1",
            "--tokenizer",
            f"hf:{assets.llama.base}",
            "--home",
            str(tmp_path / "home"),
            "--json",
        ],
    )
    assert run.exit_code == 0, run.output
    result_json = json.loads(run.stdout)
    assert result_json["store"]["content_hash"] == load_store(out).meta.content_hash
    assert result_json["data"]["layers"] == [0, 1, 2]


def test_cli_extract_json(assets: Assets, extract_app: typer.Typer, tmp_path: Path) -> None:
    result = invoke_extract(
        extract_app, assets.gpt2_dir, assets.gpt2.base, tmp_path / "s",
        "--limit", 3, "--max-answer-tokens", 2, "--json",
        data=f"gsm8k:{assets.data}",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["meta"]["n_problems"] == 3 and summary["resumed"] == 0 and 0 <= summary["accuracy"] <= 1


def test_cli_resumes_an_interrupted_extraction(assets: Assets, extract_app: typer.Typer, tmp_path: Path) -> None:
    def stop(event: ExtractProgress) -> None:
        if event.shards_done >= 1:
            raise KeyboardInterrupt

    out = tmp_path / "store"
    with pytest.raises(KeyboardInterrupt):
        run_extract(assets, assets.gpt2_dir, assets.gpt2, out, progress=stop, shard_size=5, limit=8)
    result = invoke_extract(
        extract_app, assets.gpt2_dir, assets.gpt2.base, out,
        "--lora-alpha", ALPHA, "--dtype", "fp32", "--max-answer-tokens", MAX_ANSWER, "--shard-size", 5, "--limit", 8,
        data=f"gsm8k:{assets.data}",
    )
    assert result.exit_code == 0, result.output
    assert "5 resumed" in result.stdout and load_store(out).meta.n_problems == 8


def broken_checkpoint(assets: Assets, directory: Path, change) -> Path:
    state = dict(assets.llama_state)
    change(state)
    return save_checkpoint(state, directory, "safetensors")


def test_cli_errors_are_one_line(assets: Assets, extract_app: typer.Typer, tmp_path: Path) -> None:
    def attempt(model: Path, *extra: str, data: str | None = None):
        return invoke_extract(
            extract_app, model, assets.llama.base, tmp_path / "out", "--device", "cpu", *extra,
            data=data or f"gsm8k:{assets.data}",
        )

    no_prj = broken_checkpoint(
        assets, tmp_path / "no-prj", lambda s: [s.pop(k) for k in list(s) if k.startswith("prj.")]
    )
    lora_key = f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.default.weight"
    bad_lora = broken_checkpoint(assets, tmp_path / "bad-lora", lambda s: s.__setitem__(lora_key, torch.zeros(R, 31)))
    cases = [
        (attempt(tmp_path / "absent"), 10, "not found"),
        (attempt(no_prj), 10, "lacks prj.1.weight, prj.3.weight"),
        (attempt(bad_lora), 10, "LoRA weights of model.layers.0.self_attn.q_proj do not fit"),
        (attempt(assets.llama_dir, "--lora-r", "8"), 2, "LoRA rank is 4"),
        (attempt(assets.llama_dir, data=f"gsm8k:{tmp_path / 'absent.jsonl'}"), 4, "not found"),
        (attempt(assets.llama_dir, data="csv:x"), 4, "unknown source spec"),
        (attempt(assets.llama_dir, data=f"store:{tmp_path}"), 4, "use 'gsm8k:PATH', 'aug:PATH' or 'hf:DIR'"),
        (attempt(assets.llama_dir, "--tokenizer", tmp_path / "no-tokenizer"), 5, "tokenizer directory"),
        (attempt(assets.llama_dir, "--batch-size", "0"), 2, "batch_size"),
        (invoke(extract_app, "extract", "--model", assets.llama_dir, "--out", tmp_path / "o"), 2, "--data"),
    ]
    for result, code, fragment in cases:
        assert_one_line_error(result, code, fragment)
    assert not (tmp_path / "out").exists() and not partial_path(tmp_path / "out").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    taken = invoke(
        extract_app,
        "extract",
        "--model",
        assets.llama_dir,
        "--base",
        assets.llama.base,
        "--data",
        f"gsm8k:{assets.data}",
        "--out",
        tmp_path / "taken",
    )
    assert_one_line_error(taken, 3, "already exists")


def test_cli_missing_base_config(assets: Assets, extract_app: typer.Typer, tmp_path: Path) -> None:
    result = invoke(
        extract_app, "extract", "--model", assets.llama_dir, "--data", f"gsm8k:{assets.data}", "--out", tmp_path / "o"
    )
    assert_one_line_error(result, 10, "has no config.json")


# --- import ---------------------------------------------------------------------------------------


def flatten(store_path: Path, directory: Path, fmt: str, drop_bot: bool = False) -> tuple[Path, Path]:
    """Write a store in the import layout (rows shuffled), with its head file."""
    store = load_store(store_path)
    P, S, T1, _ = store.hidden.shape
    axes = torch.meshgrid(torch.arange(P), torch.arange(S), torch.arange(T1), indexing="ij")
    grid = torch.stack(axes, dim=-1).view(-1, 3)  # (P*S*(T+1), 3): problem, layer, position
    order = torch.randperm(len(grid), generator=torch.Generator().manual_seed(0))
    grid = grid[order]
    if drop_bot:
        grid = grid[grid[:, 2] != T1 - 1]
    rows = {
        "hidden": store.hidden[grid[:, 0], grid[:, 1], grid[:, 2]].clone(),
        "layer": grid[:, 1].clone(),
        "position": torch.where(grid[:, 2] == T1 - 1, -1, grid[:, 2]),
        "problem": grid[:, 0].clone(),
    }
    directory.mkdir()
    head = directory / "head.safetensors"
    save_file({k: v.contiguous() for k, v in head_tensors(store).items()}, str(head))
    if fmt == "safetensors":
        save_file(rows, str(directory / "states.safetensors"))
        return directory / "states.safetensors", head
    torch.save(rows, directory / "states.pt")
    return directory / "states.pt", head


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_import_round_trips_a_store(stores: dict[str, Path], tmp_path: Path, fmt: str) -> None:
    original = load_store(stores["gpt2"])
    tensors, head = flatten(stores["gpt2"], tmp_path / "files", fmt)
    spec = ImportSpec(
        tensors=tensors, head=head, problems=str(stores["gpt2"] / "problems.jsonl"), tokenizer=original.meta.tokenizer
    )
    imported = load_store(import_store(spec, tmp_path / "imported"))
    assert imported.meta.content_hash == original.meta.content_hash
    assert imported.meta.norm == original.meta.norm and imported.meta.normed_states == original.meta.normed_states


def test_cli_import_and_its_errors(stores: dict[str, Path], extract_app: typer.Typer, tmp_path: Path) -> None:
    tokenizer = load_store(stores["llama"]).meta.tokenizer
    tensors, head = flatten(stores["llama"], tmp_path / "files", "safetensors", drop_bot=True)
    problems = stores["llama"] / "problems.jsonl"

    def attempt(*extra: str, tensors: Path = tensors, out: str = "imported", problems: Path | str = problems):
        return invoke(
            extract_app,
            "import",
            "--tensors",
            tensors,
            "--head",
            head,
            "--problems",
            problems,
            "--tokenizer",
            tokenizer,
            "--out",
            tmp_path / out,
            *extra,
        )

    ok = attempt()
    assert ok.exit_code == 0, ok.output
    assert ok.stdout.startswith(f"wrote {tmp_path / 'imported'}: 12 problems, 3 states x 6 positions x 32 hidden")
    imported, original = load_store(tmp_path / "imported"), load_store(stores["llama"])
    torch.testing.assert_close(imported.hidden[:, :, :T], original.hidden[:, :, :T], atol=0, rtol=0)
    assert float(imported.hidden[:, :, T].abs().max()) == 0.0  # absent bot states are zeros

    rows = load_file(str(tensors))
    rows = {k: v[1:] for k, v in rows.items()}  # one cell missing
    save_file(rows, str(tmp_path / "missing.safetensors"))
    assert_one_line_error(attempt(tensors=tmp_path / "missing.safetensors", out="x"), 3, "has no state for problem")
    assert_one_line_error(attempt(tensors=tmp_path / "absent.pt", out="x"), 3, "not found")
    assert_one_line_error(attempt(out="imported"), 3, "already exists")
    assert_one_line_error(attempt("--normed-states", "9", out="x"), 2, "--normed-states")
    assert_one_line_error(attempt(out="x", problems="world"), 4, "use 'gsm8k:PATH', 'aug:PATH', 'hf:DIR' or a JSONL file of problem records")
    shutil.rmtree(tmp_path / "imported")
