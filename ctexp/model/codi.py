"""A CODI model for extraction: its checkpoint loaded and merged, and its continuous-thought loop.

CODI (continuous chain-of-thought via self-distillation) reasons in ``T`` latent steps between two
special ids. ctexp reimplements its inference loop from the description in the project's issue:

1. Special ids follow the base vocabulary ``V``: ``pad = V``, ``bot = V + 1``, ``eot = V + 2``; the
   checkpoint's embedding and LM head have ``V + 3`` rows. They are ids only, not tokenizer tokens.
2. The question is tokenized with no template (a LLaMA tokenizer adds BOS; GPT-2's adds nothing),
   ``bot`` is appended, and one forward pass fills the KV cache. ``h`` is the last layer's hidden
   state at the last position (transformers has applied the final norm to it) and ``z = prj(h)``.
3. ``T`` latent steps: ``z`` is fed as ``inputs_embeds`` with the cache, ``h`` is the new last
   state, ``z = prj(h)``.
4. The answer: the embedding of ``eot`` is fed, then tokens are decoded greedily (over the ``V``
   real tokens) until an EOS id or ``max_answer_tokens``; the text should read "The answer is: X".

``prj`` is ``Linear(d, p) -> GELU -> Linear(p, d) -> LayerNorm(d)`` (the LayerNorm may be absent;
``p`` is read from the weights). Unlike CODI's own loop, batches are left-padded *with* an attention
mask and per-row position ids, so a problem gets the same states in a batch as on its own.

What is recorded, per problem: ``hidden_states[0..L]`` (as transformers returns them: 0 is the
embedding output, L the last block's output after the final norm) at each latent position
(store positions 0..T-1) and at the ``bot`` position (store position T); the decoded answer and
whether it matches the problem's. The store's head is the final norm (weight, plus bias for GPT-2's
LayerNorm) and the first ``V`` rows of the LM head: the three special rows are left out because no
CoT token can be one of them, so the store's ``vocab`` is the tokenizer's and lenses never score them.

Checkpoints (``model.safetensors``, or ``pytorch_model.bin`` loaded with ``weights_only=True``) hold
the PEFT-wrapped model: ``codi.base_model.model.<base key>``, with LoRA modules split into
``<module>.base_layer.weight``, ``<module>.lora_A.<adapter>.weight`` (r x in) and
``<module>.lora_B.<adapter>.weight`` (out x r), and ``prj.1.*``, ``prj.3.*``, ``prj.ln.*``. The
target modules are those that have LoRA keys; each is merged as ``W + (B @ A) * alpha / r`` (in
float32, then cast), transposed for GPT-2's ``Conv1D`` whose weights are stored (in, out).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ctexp.data.problems import Problem
from ctexp.data.store import NormSpec
from ctexp.errors import ConfigError, ModelError, TokenizerError

CHECKPOINT_FILES = ("model.safetensors", "pytorch_model.bin")
WRAPPER_PREFIXES = ("codi.base_model.model.", "codi.")  # PEFT-wrapped first; a plain fine-tune second
PRJ_PREFIX = "prj."
N_SPECIAL = 3  # pad, bot, eot
PRJ_LN_EPS = 1e-5  # nn.LayerNorm's default, which CODI's prj uses
# Buffers that older transformers versions saved with the weights; harmless to skip.
_SKIPPABLE_SUFFIXES = ("rotary_emb.inv_freq", "attn.bias", "attn.masked_bias")
_LORA_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.(?P<adapter>[^.]+)\.weight$")
_ANSWER_MARK = "The answer is:"
_NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")
FIT_BASE = "--base must be the model CODI was trained from"


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
            raise ModelError(f"{path} is not a readable safetensors file ({_first_line(error)})") from None
    try:
        state = _torch_load(path)
    except Exception as error:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        raise ModelError(
            f"{path} cannot be loaded as plain weights ({_first_line(error)}); only tensor dicts load safely"
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


def _first_line(error: BaseException) -> str:
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


# --- the projection -------------------------------------------------------------------------------


class Projection(nn.Module):
    """CODI's prj: ``Linear(d, p) -> GELU -> Linear(p, d) -> LayerNorm(d)`` (LayerNorm optional)."""

    def __init__(self, hidden: int, inner: int, layer_norm: bool, bias: bool = True) -> None:
        super().__init__()
        self.up = nn.Linear(hidden, inner, bias=bias)
        self.down = nn.Linear(inner, hidden, bias=bias)
        self.ln = nn.LayerNorm(hidden, eps=PRJ_LN_EPS) if layer_norm else None

    @classmethod
    def from_weights(cls, weights: dict[str, torch.Tensor], hidden: int) -> Projection:
        """Build prj from its checkpoint tensors (keys ``1.*``, ``3.*``, ``ln.*``); sizes come from the weights.

        Raises:
            ModelError: The weights do not chain ``hidden -> p -> hidden``.
        """
        up, down = weights["1.weight"], weights["3.weight"]
        inner = up.shape[0]
        layer_norm = "ln.weight" in weights
        if up.dim() != 2 or tuple(up.shape) != (inner, hidden) or tuple(down.shape) != (hidden, inner):
            raise ModelError(
                f"prj weights have shapes prj.1 {tuple(up.shape)} and prj.3 {tuple(down.shape)}, "
                f"expected ({inner}, {hidden}) "
                f"and ({hidden}, {inner}) for hidden size {hidden}; the checkpoint does not belong to this base model"
            )
        bias = "1.bias" in weights
        projection = cls(hidden, inner, layer_norm, bias=bias)
        names = {
            "1.weight": "up.weight",
            "1.bias": "up.bias",
            "3.weight": "down.weight",
            "3.bias": "down.bias",
            "ln.weight": "ln.weight",
            "ln.bias": "ln.bias",
        }
        state = {names[k]: v for k, v in weights.items() if k in names}
        try:
            projection.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise ModelError(f"prj weights do not load: {_first_line(error)}") from None
        return projection

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = self.down(nn.functional.gelu(self.up(h)))  # (B, 1, d)
        return self.ln(z) if self.ln is not None else z


# --- the model ------------------------------------------------------------------------------------


def load_hf_tokenizer(path: Path) -> Any:
    """Load a local Hugging Face tokenizer (never from the hub).

    Raises:
        TokenizerError: The directory is missing or holds no loadable tokenizer.
    """
    if not path.is_dir():
        raise TokenizerError(
            f"tokenizer directory {path} not found; pass --tokenizer DIR (default: the base directory)"
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as error:  # noqa: BLE001 - transformers raises many types for incomplete directories
        raise TokenizerError(
            f"cannot load a tokenizer from {path} ({_first_line(error)}); pass --tokenizer DIR"
        ) from None


def question_ids(tokenizer: Any, question: str) -> list[int]:
    """The question's ids as CODI feeds them: no template, the tokenizer's own BOS (LLaMA) if any."""
    return list(tokenizer(question)["input_ids"])


@dataclass(frozen=True)
class Thoughts:
    """What one batch produced."""

    hidden: torch.Tensor  # (B, S, T+1, d) on the CPU; index T is the bot state
    answers: list[list[int]]  # greedy answer ids per problem, EOS excluded


@dataclass
class CodiModel:
    """A merged CODI model ready to think: the base LM, prj, and the special ids.

    Attributes:
        lm: The transformers causal LM with LoRA merged and ``V + 3`` embedding rows.
        prj: The projection from a last hidden state to the next latent input.
        vocab: ``V``, the base vocabulary (special ids are V, V+1, V+2).
        eos_ids: Ids that end an answer.
    """

    lm: Any
    prj: Projection
    vocab: int
    eos_ids: frozenset[int]

    def __post_init__(self) -> None:
        # The cache keyword differs between transformers 5 releases ("past_key_values", later "cache").
        self._arguments = frozenset(inspect.signature(type(self.lm).forward).parameters)

    @property
    def pad_id(self) -> int:
        return self.vocab

    @property
    def bot_id(self) -> int:
        return self.vocab + 1

    @property
    def eot_id(self) -> int:
        return self.vocab + 2

    @property
    def device(self) -> torch.device:
        return self.lm.get_input_embeddings().weight.device

    @property
    def n_states(self) -> int:
        return int(self.lm.config.num_hidden_layers) + 1

    @property
    def hidden(self) -> int:
        return int(self.lm.get_input_embeddings().weight.shape[1])

    def head(self) -> tuple[NormSpec, dict[str, torch.Tensor]]:
        """The store's head: final norm spec and tensors, and the LM head's first V rows.

        Raises:
            ModelError: The model has no recognisable final norm.
        """
        norm = _final_norm(self.lm)
        tensors = {
            "norm.weight": norm.weight.detach().cpu(),
            "unembed.weight": self.lm.get_output_embeddings().weight.detach()[: self.vocab].cpu(),
        }
        if isinstance(norm, nn.LayerNorm):
            if norm.bias is not None:
                tensors["norm.bias"] = norm.bias.detach().cpu()
            else:
                tensors["norm.bias"] = torch.zeros_like(tensors["norm.weight"])
            return NormSpec(kind="layernorm", eps=float(norm.eps)), tensors
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
        return NormSpec(kind="rmsnorm", eps=float(eps)), tensors

    @torch.inference_mode()
    def think(self, prompts: list[list[int]], n_positions: int, max_answer_tokens: int) -> Thoughts:
        """Run CODI's loop on a batch of questions (ids without bot) and record the states.

        Args:
            prompts: Question ids per problem, as ``question_ids`` gives them.
            n_positions: Latent steps T.
            max_answer_tokens: Greedy decoding stops after this many tokens.

        Returns:
            The states at every latent position and at bot, and the answer ids.
        """
        ids, mask = _left_pad([[*p, self.bot_id] for p in prompts], self.pad_id, self.device)  # (B, n)
        # Per-row positions count real tokens only, so padding does not shift a row's positions.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, n)
        out = self._forward(input_ids=ids, attention_mask=mask, position_ids=positions, cache=None, hidden=True)
        bot = _last_position(out.hidden_states)  # (B, S, d)
        cache, position = _cache_of(out), positions[:, -1:]  # (B, 1)
        latent = []
        for _ in range(n_positions):
            z = self.prj(out.hidden_states[-1][:, -1:])  # (B, 1, d)
            mask, position = _grow(mask), position + 1
            out = self._forward(inputs_embeds=z, attention_mask=mask, position_ids=position, cache=cache, hidden=True)
            latent.append(_last_position(out.hidden_states))  # (B, S, d)
            cache = _cache_of(out)
        hidden = torch.stack([*latent, bot], dim=2)  # (B, S, T+1, d)
        answers = self._answer(mask, position, cache, max_answer_tokens)
        return Thoughts(hidden.cpu(), answers)

    def _answer(self, mask: torch.Tensor, position: torch.Tensor, cache: Any, max_tokens: int) -> list[list[int]]:
        """Feed eot, then decode greedily over the V real tokens until every row has hit an EOS id."""
        embed = self.lm.get_input_embeddings()
        batch = mask.shape[0]
        x = embed(torch.full((batch, 1), self.eot_id, device=self.device))  # (B, 1, d)
        eos = torch.tensor(sorted(self.eos_ids), dtype=torch.long, device=self.device)
        done = torch.zeros(batch, dtype=torch.bool, device=self.device)
        generated = []
        for _ in range(max_tokens):
            mask, position = _grow(mask), position + 1
            out = self._forward(inputs_embeds=x, attention_mask=mask, position_ids=position, cache=cache, hidden=False)
            cache = _cache_of(out)
            token = out.logits[:, -1, : self.vocab].argmax(-1)  # (B,)
            generated.append(token)
            done |= torch.isin(token, eos)
            if bool(done.all()):
                break
            x = embed(token[:, None])  # (B, 1, d)
        rows = torch.stack(generated, dim=1).tolist()  # (B, steps)
        return [_until_eos(row, self.eos_ids) for row in rows]

    def _forward(self, *, cache: Any, hidden: bool, **inputs: Any) -> Any:
        """One forward pass with the cache, recording hidden states where asked."""
        if cache is not None:
            inputs["cache" if "cache" in self._arguments else "past_key_values"] = cache
        if "logits_to_keep" in self._arguments:
            inputs["logits_to_keep"] = 1  # only the last position's logits are ever used
        return self.lm(**inputs, use_cache=True, output_hidden_states=hidden)


def _cache_of(out: Any) -> Any:
    return out["cache"] if "cache" in out else out["past_key_values"]


def _last_position(hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return torch.stack([h[:, -1] for h in hidden_states], dim=1)  # (B, S, d)


def _grow(mask: torch.Tensor) -> torch.Tensor:
    return torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)  # (B, n + 1)


def _left_pad(rows: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (B, n)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, n)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def _until_eos(row: list[int], eos: frozenset[int]) -> list[int]:
    for i, token in enumerate(row):
        if token in eos:
            return row[:i]
    return row


def _final_norm(lm: Any) -> nn.Module:
    base = lm.base_model
    for name in ("norm", "ln_f", "final_layernorm", "final_layer_norm"):
        module = getattr(base, name, None)
        if isinstance(module, nn.Module) and hasattr(module, "weight"):
            return module
    raise ModelError(f"cannot find the final norm of {type(lm).__name__}; ctexp supports LLaMA- and GPT-2-style models")


def load_codi(
    files: ModelFiles,
    tokenizer: Any,
    device: torch.device,
    dtype: torch.dtype,
    lora_r: int = 128,
    lora_alpha: float = 32.0,
) -> CodiModel:
    """Build the base model from its config, load the checkpoint into it with LoRA merged, and build prj.

    Args:
        files: Checkpoint, base and tokenizer locations.
        tokenizer: The loaded tokenizer (for its EOS id).
        device: Where the model runs.
        dtype: What the model runs in (bfloat16 as CODI, or float32).
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
        raise ModelError(f"cannot read the base config in {files.base} ({_first_line(error)})") from None
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
    prj = Projection.from_weights(prj_state, int(state[names[0]].shape[1])).to(device=device, dtype=dtype).eval()
    return CodiModel(
        lm.eval().requires_grad_(False),
        prj.requires_grad_(False),
        vocab,
        _eos_ids(files.base, tokenizer, model_config, vocab),
    )


def _embedding_names(model_config: Any) -> tuple[str, str]:
    """The state-dict keys of the input embedding and the LM head, from a weightless skeleton."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(model_config)
    except Exception as error:  # noqa: BLE001 - an unknown model_type, a malformed config
        raise ModelError(f"cannot build a causal LM from the base config ({_first_line(error)})") from None
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
        detail = next((line.strip() for line in str(error).splitlines() if "size mismatch" in line), _first_line(error))
        raise ModelError(f"{path} does not fit the base model: {detail}; {FIT_BASE}") from None
    if missing:
        raise ModelError(f"{path} lacks {len(missing)} weights of the base model, e.g. {missing[0]}; {FIT_BASE}")
    if extra:
        raise ModelError(f"{path} has {len(extra)} weights the base model lacks, e.g. {extra[0]}; {FIT_BASE}")


def _eos_ids(base: Path, tokenizer: Any, model_config: Any, vocab: int) -> frozenset[int]:
    """EOS ids from the tokenizer, the config and generation_config.json (LLaMA-3 lists several)."""
    found: set[int] = set()
    sources: list[Any] = [tokenizer.eos_token_id, getattr(model_config, "eos_token_id", None)]
    generation = base / "generation_config.json"
    if generation.is_file():
        with contextlib.suppress(OSError, ValueError):
            sources.append(json.loads(generation.read_text(encoding="utf-8")).get("eos_token_id"))
    for value in sources:
        for token in value if isinstance(value, list) else [value]:
            if isinstance(token, int) and 0 <= token < vocab:
                found.add(token)
    return frozenset(found)


# --- answers --------------------------------------------------------------------------------------


def parse_answer(text: str) -> str | None:
    """The number a decoded answer gives: the first after "The answer is:", else the last in the text.

    Args:
        text: The decoded answer, e.g. ``"The answer is: 1,200"``.

    Returns:
        The number as written (thousands commas dropped), or None where there is none.
    """
    _, mark, tail = text.partition(_ANSWER_MARK)
    numbers = _NUMBER_RE.findall((tail if mark else text).replace(",", ""))
    if not numbers:
        return None
    return numbers[0] if mark else numbers[-1]


def answers_match(predicted: str | None, answer: str) -> bool:
    """Whether a predicted answer equals the problem's, numerically where both are numbers."""
    if predicted is None:
        return False
    try:
        return math.isclose(float(predicted), float(answer.replace(",", "")), rel_tol=1e-9, abs_tol=1e-6)
    except ValueError:
        return predicted.strip() == answer.strip()


def answered(problem: Problem, text: str) -> Problem:
    """The problem with ``predicted`` (the parsed number, else the stripped text) and ``correct`` filled."""
    number = parse_answer(text)
    predicted = number if number is not None else text.strip()
    return problem.model_copy(update={"predicted": predicted, "correct": answers_match(number, problem.answer)})
