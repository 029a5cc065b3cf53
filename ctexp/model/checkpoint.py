"""CODI checkpoints: finding and reading the files, and the base model loaded with LoRA merged.

Checkpoints (``model.safetensors``, or ``pytorch_model.bin`` loaded with ``weights_only=True``) hold
the PEFT-wrapped model: ``codi.base_model.model.<base key>``, with LoRA modules split into
``<module>.base_layer.weight``, ``<module>.lora_A.<adapter>.weight`` (r x in) and
``<module>.lora_B.<adapter>.weight`` (out x r), and ``prj.1.*``, ``prj.3.*``, ``prj.ln.*``. The
target modules are those that have LoRA keys; each is merged as ``W + (B @ A) * alpha / r`` (in
float32, then cast), transposed for GPT-2's ``Conv1D`` whose weights are stored (in, out).

The embedding and LM head have ``V + 3`` rows: the base vocabulary ``V`` and CODI's special ids
(``pad = V``, ``bot = V + 1``, ``eot = V + 2``). ``load_merged_lm`` builds the base model from its
config with ``V + 3`` rows, loads every weight with LoRA merged, and hands prj's tensors back for
``codi.Projection``.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ctexp.errors import ConfigError, ModelError

CHECKPOINT_FILES = ("model.safetensors", "pytorch_model.bin")
WRAPPER_PREFIXES = ("codi.base_model.model.", "codi.")  # PEFT-wrapped first; a plain fine-tune second
PRJ_PREFIX = "prj."
N_SPECIAL = 3  # pad, bot, eot
# Buffers that older transformers versions saved with the weights; harmless to skip.
_SKIPPABLE_SUFFIXES = ("rotary_emb.inv_freq", "attn.bias", "attn.masked_bias")
_LORA_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.(?P<adapter>[^.]+)\.weight$")
FIT_BASE = "--base must be the model CODI was trained from"
# CODI's name for T (its training argument), where a checkpoint's config.json records it (ctexp codi
# train writes it); a checkpoint without it ran CODI's default.
LATENTS_KEY = "num_latent"
DEFAULT_LATENTS = 6


@dataclass(frozen=True)
class ModelFiles:
    """The local files an extraction reads."""

    checkpoint: Path
    base: Path
    tokenizer: Path


# --- checkpoint files -----------------------------------------------------------------------------


def resolve_files(model: Path, base: Path | None = None, tokenizer: Path | None = None) -> ModelFiles:
    """Find the checkpoint file, the base config directory and the tokenizer directory.

    Args:
        model: The checkpoint directory, or the checkpoint file.
        base: The base model directory (with config.json); default: the checkpoint's directory.
        tokenizer: The tokenizer directory; default: ``base``.

    Raises:
        ModelError: A directory or file is missing.
    """
    checkpoint = find_checkpoint(model)
    model_dir = model.expanduser() if model.expanduser().is_dir() else model.expanduser().parent
    if base is not None:
        base = base.expanduser()
        if not (base / "config.json").is_file():
            raise ModelError(
                f"base model directory {base} has no config.json; pass --base DIR of the model CODI was trained from"
            )
    elif (model_dir / "config.json").is_file():
        base = model_dir
    else:
        raise ModelError(
            f"{model_dir} has no config.json; pass --base DIR with the base model's config.json and tokenizer"
        )
    tokenizer = (tokenizer or base).expanduser()
    return ModelFiles(checkpoint.resolve(), base.resolve(), tokenizer.resolve())


def recorded_latents(model: Path) -> int:
    """T, the latent steps the checkpoint at ``model`` was trained with: its config.json's ``num_latent``, else 6.

    Raises:
        ModelError: config.json is not JSON, or its ``num_latent`` is not a positive integer.
    """
    import json

    model = model.expanduser()
    config = (model if model.is_dir() else model.parent) / "config.json"
    if not config.is_file():
        return DEFAULT_LATENTS
    try:
        latents = json.loads(config.read_text(encoding="utf-8")).get(LATENTS_KEY, DEFAULT_LATENTS)
    except (OSError, ValueError, AttributeError) as error:
        raise ModelError(f"cannot read {config}: {first_line(error)}") from None
    if not isinstance(latents, int) or isinstance(latents, bool) or latents < 1:
        raise ModelError(f"{config}: {LATENTS_KEY} must be a positive integer, not {latents!r}; pass --positions T")
    return latents


def find_checkpoint(model: Path) -> Path:
    """The checkpoint file of ``--model``: the path itself, or the first of CHECKPOINT_FILES in it.

    Raises:
        ModelError: Neither exists.
    """
    model = model.expanduser()
    if model.is_file():
        return model
    if not model.is_dir():
        raise ModelError(f"model {model} not found; pass --model DIR holding model.safetensors or pytorch_model.bin")
    for name in CHECKPOINT_FILES:
        if (model / name).is_file():
            return model / name
    raise ModelError(f"{model} holds neither model.safetensors nor pytorch_model.bin; pass a CODI checkpoint directory")


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Read every tensor of a checkpoint file (torch files with ``weights_only=True`` only).

    Raises:
        ModelError: The file is corrupt, not a flat dict of tensors, or would need unsafe unpickling.
    """
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise ModelError(f"{path} is not a readable safetensors file ({first_line(error)})") from None
    try:
        state = _torch_load(path)
    except Exception as error:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        raise ModelError(
            f"{path} cannot be loaded as plain weights ({first_line(error)}); only tensor dicts load safely"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise ModelError(f"{path} is not a flat dict of named tensors; pass a state-dict checkpoint")
    return state


def _torch_load(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True``, memory-mapped where the file format allows."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:
        if "mmap" not in str(error):  # only legacy (non-zip) files cannot be memory-mapped
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def first_line(error: BaseException) -> str:
    """An error's first line, for a one-line message (its type where it has no text)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def split_checkpoint(
    state: dict[str, torch.Tensor], path: Path
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split a CODI state dict into the (still LoRA-wrapped) base model's tensors and prj's.

    Returns:
        ``(base, prj)`` with the wrapper prefix and ``prj.`` removed from the keys.

    Raises:
        ModelError: No ``codi.`` keys, or no ``prj.1`` / ``prj.3`` weights.
    """
    prefix = next((p for p in WRAPPER_PREFIXES if any(k.startswith(p) for k in state)), None)
    if prefix is None:
        raise ModelError(f"{path} has no 'codi.' keys; pass a checkpoint saved by CODI's training")
    base = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    prj = {k.removeprefix(PRJ_PREFIX): v for k, v in state.items() if k.startswith(PRJ_PREFIX)}
    missing = [f"prj.{k}" for k in ("1.weight", "3.weight") if k not in prj]
    if missing:
        raise ModelError(
            f"{path} lacks {', '.join(missing)}; ctexp needs a CODI checkpoint trained with a projection (prj)"
        )
    return base, prj


# --- LoRA merge -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraModule:
    """One LoRA-wrapped module's tensors."""

    name: str
    weight: torch.Tensor  # (out, in) for nn.Linear, (in, out) for Conv1D
    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)


def lora_modules(wrapped: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[LoraModule]]:
    """Separate LoRA-wrapped modules from plain tensors.

    Returns:
        ``(plain, modules)``: plain tensors under their base keys (``base_layer.`` removed from
        biases), and the modules to merge, in key order.

    Raises:
        ModelError: A LoRA module lacks one of its parts, or holds several adapters.
    """
    plain: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in wrapped.items():
        match = _LORA_RE.match(key)
        if match:
            slot = parts.setdefault(match["module"], {})
            if match["part"] in slot:
                raise ModelError(f"{match['module']} holds several LoRA adapters; merge all but one before extracting")
            slot[match["part"]] = tensor
        elif key.endswith(".base_layer.weight"):
            parts.setdefault(key.removesuffix(".base_layer.weight"), {})["W"] = tensor
        elif ".base_layer." in key:
            plain[key.replace(".base_layer.", ".")] = tensor
        elif ".lora_" in key:
            raise ModelError(f"unsupported LoRA tensor {key}; ctexp merges lora_A/lora_B of linear layers only")
        else:
            plain[key] = tensor
    modules = []
    for name, slot in sorted(parts.items()):
        absent = [
            label for label, part in (("base_layer.weight", "W"), ("lora_A", "A"), ("lora_B", "B")) if part not in slot
        ]
        if absent:
            raise ModelError(f"LoRA module {name} lacks {', '.join(absent)}; the checkpoint is incomplete")
        modules.append(LoraModule(name, slot["W"], slot["A"], slot["B"]))
    return plain, modules


def merge_lora(
    module: LoraModule, transposed: bool, r: int, alpha: float, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``W + (B @ A) * alpha / r``, computed in float32.

    Args:
        module: The module's base weight and LoRA factors.
        transposed: W is stored (in, out), as GPT-2's Conv1D stores it.
        r: LoRA rank from the flags; must equal the factors' inner size.
        alpha: LoRA alpha from the flags.
        dtype: The result's dtype (default: W's); the model's, so a bf16 checkpoint run in fp32
            keeps the merge's float32 precision.

    Raises:
        ConfigError: The factors' rank differs from ``r``.
        ModelError: The factors do not fit W.
    """
    a, b, weight = module.a, module.b, module.weight
    out_features, in_features = (weight.shape[1], weight.shape[0]) if transposed else tuple(weight.shape)
    if (
        a.dim() != 2
        or b.dim() != 2
        or a.shape[1] != in_features
        or b.shape[0] != out_features
        or a.shape[0] != b.shape[1]
    ):
        raise ModelError(
            f"LoRA weights of {module.name} do not fit its weight {tuple(weight.shape)}: lora_A {tuple(a.shape)} "
            f"(expected (r, {in_features})), lora_B {tuple(b.shape)} (expected ({out_features}, r)); "
            "the checkpoint is inconsistent"
        )
    if a.shape[0] != r:
        raise ConfigError(
            f"the checkpoint's LoRA rank is {a.shape[0]} ({module.name}) but --lora-r is {r}; "
            f"pass --lora-r {a.shape[0]} and its --lora-alpha"
        )
    delta = (b.float() @ a.float()) * (alpha / r)  # (out, in)
    merged = weight.float() + (delta.T if transposed else delta)
    return merged.to(dtype or weight.dtype)


# --- the base model, LoRA merged -------------------------------------------------------------------


@dataclass(frozen=True)
class MergedLM:
    """A checkpoint's base model, ready for CODI's loop, and what else the checkpoint holds.

    Attributes:
        lm: The transformers causal LM with LoRA merged, ``V + 3`` embedding rows and untied head.
        prj: prj's tensors (keys ``1.*``, ``3.*``, ``ln.*``), for ``codi.Projection``.
        vocab: ``V``, the base vocabulary.
        config: The base model's transformers config (``vocab_size`` set to ``V + 3``).
        hidden: The hidden size, from the checkpoint's embedding.
    """

    lm: Any
    prj: dict[str, torch.Tensor]
    vocab: int
    config: Any
    hidden: int


def load_merged_lm(
    files: ModelFiles, device: torch.device, dtype: torch.dtype, lora_r: int, lora_alpha: float
) -> MergedLM:
    """Build the base model from its config and load the checkpoint into it with LoRA merged.

    Args:
        files: Checkpoint and base locations.
        device: Where the model runs.
        dtype: What the model runs in.
        lora_r: LoRA rank r; the checkpoint's must agree.
        lora_alpha: LoRA alpha; the merged scale is ``alpha / r``.

    Raises:
        ModelError: The config cannot be read, or the checkpoint does not fit the base model.
        ConfigError: The checkpoint's LoRA rank is not ``lora_r``.
    """
    from transformers import AutoConfig

    try:
        model_config = AutoConfig.from_pretrained(str(files.base), local_files_only=True)
    except Exception as error:  # noqa: BLE001 - transformers raises OSError, ValueError, KeyError, ...
        raise ModelError(f"cannot read the base config in {files.base} ({first_line(error)})") from None
    base_state, prj_state = split_checkpoint(read_checkpoint(files.checkpoint), files.checkpoint)
    # Separate embedding and head, each loaded from the checkpoint (CODI may have trained either).
    model_config.tie_word_embeddings = False
    names = _embedding_names(model_config)
    vocab = _check_vocab(base_state, names, model_config, files.checkpoint)
    model_config.vocab_size = vocab + N_SPECIAL
    lm = _build_lm(model_config, dtype, device)
    state = _merged_state(base_state, lm, lora_r, lora_alpha)
    state.setdefault(names[1], state[names[0]])  # a tied head saved once (safetensors dedups it)
    _load_weights(lm, state, files.checkpoint)
    return MergedLM(lm, prj_state, vocab, model_config, int(state[names[0]].shape[1]))


def _embedding_names(model_config: Any) -> tuple[str, str]:
    """The state-dict keys of the input embedding and the LM head, from a weightless skeleton."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(model_config)
    except Exception as error:  # noqa: BLE001 - an unknown model_type, a malformed config
        raise ModelError(f"cannot build a causal LM from the base config ({first_line(error)})") from None
    by_identity = {id(p): name for name, p in skeleton.named_parameters()}
    return by_identity[id(skeleton.get_input_embeddings().weight)], by_identity[
        id(skeleton.get_output_embeddings().weight)
    ]


def _check_vocab(state: dict[str, torch.Tensor], names: tuple[str, str], model_config: Any, path: Path) -> int:
    """V from the checkpoint's embedding (V + 3 rows), checked against the base config and the head."""
    embedding_key, head_key = names
    if embedding_key not in state:
        raise ModelError(f"{path} lacks the embedding {embedding_key}; {FIT_BASE}")
    rows = int(state[embedding_key].shape[0])
    vocab = rows - N_SPECIAL
    if model_config.vocab_size not in (vocab, rows):
        raise ModelError(
            f"{path} has {rows} embedding rows but the base config's vocabulary is {model_config.vocab_size} "
            f"(expected {vocab}, plus pad, bot and eot); {FIT_BASE}"
        )
    if head_key in state and int(state[head_key].shape[0]) != rows:
        raise ModelError(
            f"{path}: LM head has {state[head_key].shape[0]} rows but the embedding {rows}; "
            "the checkpoint is inconsistent"
        )
    return vocab


def _build_lm(model_config: Any, dtype: torch.dtype, device: torch.device) -> Any:
    """Allocate the model directly on ``device`` without random init (its weights are loaded next)."""
    from transformers import AutoModelForCausalLM

    with _no_init_weights(), torch.device(device):
        return AutoModelForCausalLM.from_config(model_config, dtype=dtype)


def _no_init_weights() -> contextlib.AbstractContextManager[Any]:
    """transformers' switch that skips random init (30 s for a 1B model); a plain context where absent."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        return contextlib.nullcontext()
    return no_init_weights()


def _merged_state(wrapped: dict[str, torch.Tensor], lm: Any, r: int, alpha: float) -> dict[str, torch.Tensor]:
    """Plain tensors plus every LoRA module merged into its weight."""
    from transformers.pytorch_utils import Conv1D

    plain, modules = lora_modules(wrapped)
    for module in modules:
        try:
            target = lm.get_submodule(module.name)
        except AttributeError:
            raise ModelError(
                f"the checkpoint's LoRA module {module.name} is not in the base model; {FIT_BASE}"
            ) from None
        plain[f"{module.name}.weight"] = merge_lora(module, isinstance(target, Conv1D), r, alpha, lm.dtype)
    return plain


def _load_weights(lm: Any, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load every weight of the base model from the checkpoint; missing or extra weights are errors."""
    expected = set(lm.state_dict())
    extra = [k for k in state if k not in expected and not k.endswith(_SKIPPABLE_SUFFIXES)]
    try:
        missing = lm.load_state_dict({k: v for k, v in state.items() if k not in extra}, strict=False).missing_keys
    except RuntimeError as error:  # size mismatches
        detail = next((line.strip() for line in str(error).splitlines() if "size mismatch" in line), first_line(error))
        raise ModelError(f"{path} does not fit the base model: {detail}; {FIT_BASE}") from None
    if missing:
        raise ModelError(f"{path} lacks {len(missing)} weights of the base model, e.g. {missing[0]}; {FIT_BASE}")
    if extra:
        raise ModelError(f"{path} has {len(extra)} weights the base model lacks, e.g. {extra[0]}; {FIT_BASE}")
