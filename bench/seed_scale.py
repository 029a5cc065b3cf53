"""The reference study at its full scale, as whole commands: ``ctexp extract`` then ``ctexp run``.

Writes a random CODI checkpoint in LLaMA-3.2-1B's shape (hidden 2048, 16 layers, vocab 128,256,
LoRA r=128; random weights, so only the times mean anything) and 800 GSM8K-style problems of about
80 words, then runs, each as its own process with ``CTEXP_TIMINGS`` set (``ctexp.timings``):

    ctexp extract --model CKPT --data gsm8k:PROBLEMS --out STORE --batch-size 64 --max-answer-tokens 16
    ctexp run --store STORE --lens layer --epochs 8 --patience 8 --batch-size 32

and prints one line per phase of each command (imports, model load and LoRA merge, extraction;
imports, store load, MLflow setup, training, evaluation, results recording, figures; ``other`` is
the rest of the command's wall time: interpreter start-up, the CLI's own imports, exit), each
command's wall time, and last ``seed_scale_seconds=<both commands> extract_seconds=<..>
run_seconds=<..> training_seconds=<..>``.

``--small`` runs the same pipeline at a tiny shape (about a minute on 2 CPU cores; the test runs
it). ``--sweep`` also runs ``ctexp sweep`` on the store at 1, 2 and 4 workers sharing the device and
prints ``trials_per_hour_<workers>=<rate>`` for each.

    python bench/seed_scale.py --small
    python bench/seed_scale.py --device cuda            # needs ~16 GB of disk and ~30 GB of memory
    python bench/seed_scale.py --device cuda --sweep
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.codi_assets: the checkpoint maker the tests use

from ctexp.timings import TIMINGS_ENV, read_timings  # noqa: E402

NAMES = ["Tom", "Sara", "Ben", "Ann", "Kim", "Lee", "Max", "Jo", "Ravi", "Mia", "Omar", "Lucy", "Ivan", "Zoe"]
ITEMS = ["apples", "pens", "books", "eggs", "chairs", "coins", "cakes", "marbles", "stamps", "tickets"]
FILLER = [
    "The market opens early on weekdays and stays busy until the late afternoon.",
    "Everyone in the family agreed that the plan was sensible and fair.",
    "It had rained the whole morning, so most people stayed inside.",
    "The shop keeps a careful record of every sale in a small notebook.",
    "After lunch the children went to the park near the old library.",
    "Prices have not changed since the beginning of the year.",
]


def problems(count: int, seed: int) -> list[dict[str, str]]:
    """GSM8K-style problems of about 80 words with three arithmetic steps each."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        name, other, item = rng.choice(NAMES), rng.choice(NAMES), rng.choice(ITEMS)
        a, b, c, d = rng.randint(2, 40), rng.randint(2, 12), rng.randint(1, 90), rng.randint(1, 20)
        steps = [f"{a}*{b}={a * b}", f"{a * b}+{c}={a * b + c}", f"{a * b + c}-{d}={a * b + c - d}"]
        question = " ".join([
            rng.choice(FILLER), f"{name} buys {a} boxes of {item}, and each box holds {b} {item}.",
            rng.choice(FILLER), f"Later {other} gives {name} another {c} {item} as a present.",
            rng.choice(FILLER), f"On the way home {name} loses {d} of the {item}.",
            f"How many {item} does {name} have at the end of the day?",
        ])
        body = " ".join(f"<<{step}>>{step.split('=')[1]}" for step in steps)
        rows.append({"question": question, "answer": f"{body}\n#### {steps[-1].split('=')[1]}"})
    return rows


def make_inputs(root: Path, small: bool, count: int) -> tuple[Path, Path, Path, int]:
    """The checkpoint, its base directory and the problems file; and the LoRA rank."""
    from tests.codi_assets import LLAMA_1B, Shape, make_codi, save_checkpoint

    rows = problems(count, seed=0)
    data = root / "problems.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    shape = Shape(hidden=64, intermediate=96, layers=4, heads=4, kv_heads=2, vocab=2000, lora_r=8, prj_dim=64,
                  tokenizer_vocab=600) if small else LLAMA_1B
    codi, state = make_codi(root, "llama", shape=shape, texts=[row["question"] for row in rows[:200]])
    del codi  # the reference model: not needed here
    checkpoint = save_checkpoint(state, root / "checkpoint", "safetensors")
    return checkpoint, root / "llama-base", data, shape.lora_r


def timed_command(args: list[str], timings: Path, env: dict[str, str]) -> tuple[float, dict[str, float], str]:
    """Run ``ctexp ARGS`` as a whole process; its wall time, its phases and its stdout.

    Raises:
        SystemExit: the command failed (its stderr is printed).
    """
    timings.unlink(missing_ok=True)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "ctexp.cli", *args], capture_output=True, text=True,
                          env={**env, TIMINGS_ENV: str(timings)}, cwd=ROOT, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"ctexp {args[0]} failed with exit code {done.returncode}")
    return wall, read_timings(timings), done.stdout


def report(command: str, wall: float, phases: dict[str, float]) -> None:
    for name, seconds in phases.items():
        print(f"{command:8s} {name:28s} {seconds:8.2f} s")
    print(f"{command:8s} {'other (start-up, CLI, exit)':28s} {wall - sum(phases.values()):8.2f} s")
    print(f"{command:8s} {'whole command':28s} {wall:8.2f} s")


def sweep_rates(store: Path, root: Path, device: str, env: dict[str, str], epochs: int, trials: int) -> None:
    """``ctexp sweep`` on the store at 1, 2 and 4 workers: trials per hour, each in a fresh home."""
    for workers in (1, 2, 4):
        home = root / f"sweep-home-{workers}"
        count = max(trials, workers * 2)
        wall, _, _ = timed_command(
            ["sweep", "--store", str(store), "--device", device, "--n-trials", str(count), "--workers", str(workers),
             "--epochs", str(epochs), "--patience", str(epochs), "--batch-size", "32", "--home", str(home),
             "--search", "train.lr=log:1e-4:1e-2", "--pruner", "none", "--json"],
            root / "sweep-timings.jsonl", env,
        )
        print(f"sweep    {workers} worker(s): {count} trials in {wall:.1f} s")
        print(f"trials_per_hour_{workers}={count / wall * 3600:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="a tiny shape, for a 2-core CPU (about a minute)")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    parser.add_argument("--problems", type=int, default=None, help="problems to write [800; --small: 60]")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--sweep", action="store_true", help="also trials per hour of ctexp sweep at 1, 2, 4 workers")
    parser.add_argument("--sweep-trials", type=int, default=8, help="trials per sweep (at least 2 per worker)")
    parser.add_argument("--sweep-epochs", type=int, default=None, help="epochs per sweep trial [--epochs]")
    parser.add_argument("--work", type=Path, default=None, help="working directory [a temporary one, removed]")
    args = parser.parse_args()
    count = args.problems or (60 if args.small else 800)
    with tempfile.TemporaryDirectory(prefix="ctexp-seed-scale-") as scratch:
        root = args.work or Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        checkpoint, base, data, rank = make_inputs(root, args.small, count)
        print(f"inputs: {'tiny' if args.small else 'LLaMA-3.2-1B-shaped'} CODI checkpoint (LoRA r={rank}) and "
              f"{count} problems written in {time.perf_counter() - started:.1f} s; load average "
              f"{os.getloadavg()[0]:.2f}; device {args.device}")
        env = {key: value for key, value in os.environ.items() if key != TIMINGS_ENV}
        store, home, timings = root / "store", root / "home", root / "timings.jsonl"
        extract_wall, extract_phases, _ = timed_command(
            ["extract", "--model", str(checkpoint), "--base", str(base), "--data", f"gsm8k:{data}", "--out", str(store),
             "--device", args.device, "--batch-size", "64", "--max-answer-tokens", "16", "--lora-r", str(rank),
             "--lora-alpha", "8", "--force", "--json"],
            timings, env,
        )
        report("extract", extract_wall, extract_phases)
        run_wall, run_phases, out = timed_command(
            ["run", "--store", str(store), "--lens", "layer", "--epochs", str(args.epochs), "--patience",
             str(args.epochs), "--batch-size", "32", "--device", args.device, "--home", str(home), "--json"],
            timings, env,
        )
        report("run", run_wall, run_phases)
        result = json.loads(out)
        states = result["data"]["states"]["train"]
        print(f"run      {states:,} training states x {len(result['epochs'])} epochs; the run reports "
              f"{result['seconds']:.2f} s; load average {os.getloadavg()[0]:.2f}")
        if args.sweep:
            sweep_rates(store, root, args.device, env, args.sweep_epochs or args.epochs, args.sweep_trials)
        print(f"seed_scale_seconds={extract_wall + run_wall:.2f} extract_seconds={extract_wall:.2f} "
              f"run_seconds={run_wall:.2f} training_seconds={run_phases.get('training', 0.0):.2f}")


if __name__ == "__main__":
    main()
