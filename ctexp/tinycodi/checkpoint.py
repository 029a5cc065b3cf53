"""Writing a trained tiny CODI in CODI's checkpoint layout, and reading its settings back.

``DIR`` (what ``ctexp extract --model DIR`` reads with no other flag):

* ``model.safetensors``: the student, ``codi.<LLaMA key>`` (a plain fine-tune: no LoRA) and
  ``prj.1.*``, ``prj.3.*``, ``prj.ln.*``; embedding and LM head have ``V + 3`` rows;
* ``config.json`` (the base LLaMA config, vocabulary ``V``) and the tokenizer's files;
* ``tinycodi.json``: the settings and each model's loss history and training time;
* ``direct/``: the 0-latent model in the same layout;
* ``data/validation.jsonl``, ``data/test.jsonl``: the held-out problems as GSM8K-Aug JSONL.

Everything is written to ``DIR.partial/`` and appears at ``DIR`` by one rename, so an interrupted
training leaves no half-written checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ctexp.errors import ConfigError, ModelError
from ctexp.tinycodi.settings import TinyCodiSettings
from ctexp.tinycodi.task import TaskProblem, write_aug
from ctexp.tinycodi.train import Trained, model_config
from ctexp.tinycodi.vocab import VOCAB, save_tokenizer

SETTINGS_FILE = "tinycodi.json"
DIRECT = "direct"
DATA = "data"
SPLITS = ("validation", "test")


def check_out(out: Path, force: bool) -> None:
    """Refuse an existing ``--out`` unless ``--force`` (checked before training starts).

    Raises:
        ConfigError: ``out`` exists and ``force`` is not set, or its parent directory does not exist.
    """
    if out.exists() and not force:
        raise ConfigError(f"{out} exists; pass --force to replace it, or another --out")
    if not out.parent.is_dir():
        raise ConfigError(f"--out: directory {out.parent} does not exist")


def _write_model(trained: Trained, settings: TinyCodiSettings, directory: Path) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    state = {f"codi.{k}": v.detach().contiguous() for k, v in trained.model.lm.state_dict().items()}
    names = {"up": "1", "down": "3", "ln": "ln"}
    for key, value in trained.model.prj.state_dict().items():
        module, _, leaf = key.partition(".")
        state[f"prj.{names[module]}.{leaf}"] = value.detach().contiguous()
    save_file(state, str(directory / "model.safetensors"))
    config = model_config(settings, VOCAB)
    if trained.latents:
        config.num_latent = trained.latents  # CODI's name for T: ctexp extract's default --positions
    config.save_pretrained(directory)
    save_tokenizer(directory)


def write_checkpoint(
    out: Path, settings: TinyCodiSettings, latent: Trained, direct: Trained, held: dict[str, list[TaskProblem]],
    force: bool = False,
) -> Path:
    """Write both models, the settings and the held-out problems to ``out``, atomically.

    Raises:
        ConfigError: ``out`` exists and ``force`` is not set.
    """
    check_out(out, force)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        _write_model(latent, settings, partial)
        _write_model(direct, settings, partial / DIRECT)
        (partial / DATA).mkdir()
        for split in SPLITS:
            write_aug(held[split], partial / DATA / f"{split}.jsonl")
        summary = {
            "settings": settings.model_dump(mode="json"),
            "latent": {"latents": latent.latents, "seconds": latent.seconds, "history": latent.history},
            "direct": {"latents": direct.latents, "seconds": direct.seconds, "history": direct.history},
        }
        (partial / SETTINGS_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out


def read_summary(model: Path) -> dict[str, Any]:
    """``tinycodi.json`` of a checkpoint written by ``write_checkpoint``.

    Raises:
        ModelError: ``model`` is not a tiny-CODI checkpoint directory.
    """
    path = model.expanduser() / SETTINGS_FILE
    if not path.is_file():
        raise ModelError(f"{model} has no {SETTINGS_FILE}; pass a directory written by ctexp codi train")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        TinyCodiSettings.model_validate(summary["settings"])
    except (ValueError, KeyError, TypeError) as error:
        raise ModelError(f"{path} is damaged ({str(error).splitlines()[0]}); train it again") from None
    return summary
