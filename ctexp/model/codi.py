"""A CODI model for extraction: prj, the model wrapper and its continuous-thought loop, and loading it.

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

The checkpoint's format and the LoRA merge are in ``checkpoint``; parsing the decoded answer is in
``answers``.
"""

from __future__ import annotations

import contextlib
import inspect
import json
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ctexp.data.store import NormSpec
from ctexp.errors import ModelError, TokenizerError
from ctexp.model.checkpoint import ModelFiles, first_line, load_merged_lm

PRJ_LN_EPS = 1e-5  # nn.LayerNorm's default, which CODI's prj uses


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
            raise ModelError(f"prj weights do not load: {first_line(error)}") from None
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
            f"cannot load a tokenizer from {path} ({first_line(error)}); pass --tokenizer DIR"
        ) from None


def question_ids(tokenizer: Any, question: str) -> list[int]:
    """The question's ids as CODI feeds them: no template, the tokenizer's own BOS (LLaMA) if any."""
    return list(tokenizer(question)["input_ids"])


class ThoughtPatch(Protocol):
    """A change to CODI's thoughts while it thinks (an intervention; see ``ctexp.model.intervene``).

    Store position ``p`` is the state latent step ``p`` produces (``think`` runs steps 0..T-1).
    """

    def feedback(self, position: int, z: torch.Tensor) -> torch.Tensor:
        """The latent input fed after position ``position``: ``z = prj(h_position)`` (B, 1, d) or a replacement."""
        ...

    def during(self, lm: Any, position: int) -> AbstractContextManager[None]:
        """A context (forward hooks on ``lm``) active while latent step ``position`` runs."""
        ...


@dataclass(frozen=True)
class Thoughts:
    """What one batch produced."""

    hidden: torch.Tensor  # (B, S, T+1, d) on the CPU; index T is the bot state
    answers: list[list[int]]  # greedy answer ids per problem, EOS excluded
    # When asked for: (B, L, H, T+1, n+T) on the CPU, in the model's dtype. Layer i is the block that writes
    # state i + 1; rows are the thoughts, then bot (as in ``hidden``); keys are the batch's left-padded question
    # and bot (n wide), then the T thoughts; zero on padding and beyond each row's causal context.
    attention: torch.Tensor | None = None


@dataclass(frozen=True)
class LatentLoop:
    """CODI's loop up to eot: what the answer (or a training loss) continues from."""

    ids: torch.Tensor  # (B, n) left-padded question and bot ids
    positions: torch.Tensor  # (B, n) their position ids
    bot: torch.Tensor  # (B, S, d) the states at bot
    latent: list[torch.Tensor]  # T x (B, S, d): the state each latent step produced
    inputs: list[torch.Tensor]  # T x (B, 1, d): the latent inputs z fed
    mask: torch.Tensor  # (B, n + T) attention mask so far
    position: torch.Tensor  # (B, 1) the last position id used
    cache: Any  # the KV cache after the last latent step


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
        norm = final_norm(self.lm)
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
    def think(
        self, prompts: list[list[int]], n_positions: int, max_answer_tokens: int, patch: ThoughtPatch | None = None,
        attention: bool = False,
    ) -> Thoughts:
        """Run CODI's loop on a batch of questions (ids without bot) and record the states.

        Args:
            prompts: Question ids per problem, as ``question_ids`` gives them.
            n_positions: Latent steps T.
            max_answer_tokens: Greedy decoding stops after this many tokens.
            patch: Changes a thought on the way (an intervention); None runs CODI as it is.
            attention: Also record the attention weights of bot and every thought (see ``_attention``).

        Returns:
            The states at every latent position and at bot, the answer ids, and the attention if asked.
        """
        loop = self.latents(prompts, n_positions, patch)
        hidden = torch.stack([*loop.latent, loop.bot], dim=2)  # (B, S, T+1, d)
        answers = self._answer(loop.mask, loop.position, loop.cache, max_answer_tokens)
        weights = None
        if attention:
            weights = self._attention(loop.ids, loop.mask, loop.positions, torch.cat(loop.inputs, dim=1))
        return Thoughts(hidden.cpu(), answers, weights)

    def latents(
        self, prompts: list[list[int]], n_positions: int, patch: ThoughtPatch | None = None,
        isolated: torch.Tensor | None = None,
    ) -> LatentLoop:
        """The question with bot, then ``n_positions`` latent steps: CODI's loop up to (not including) eot.

        Runs with gradients where the caller allows them, so that ``think`` (inference) and tiny-CODI's
        training (``ctexp.tinycodi``) share one loop.

        Args:
            isolated: (B,) bool, a training device: in these rows each latent step attends to the question,
                bot and itself only, and what follows the loop sees only the last thought, so a value can
                pass from one thought to the next only through the fed-back ``z``. None: CODI as it is.
        """
        ids, mask = _left_pad([[*p, self.bot_id] for p in prompts], self.pad_id, self.device)  # (B, n)
        # Per-row positions count real tokens only, so padding does not shift a row's positions.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, n)
        out = self._forward(input_ids=ids, attention_mask=mask, position_ids=positions, cache=None, hidden=True)
        bot = _last_position(out.hidden_states)  # (B, S, d)
        cache, position = _cache_of(out), positions[:, -1:]  # (B, 1)
        latent, inputs = [], []
        for step in range(n_positions):
            z = self.prj(out.hidden_states[-1][:, -1:])  # (B, 1, d)
            if patch is not None and step > 0:  # z is the projection of store position step - 1
                z = patch.feedback(step - 1, z)
            inputs.append(z)  # after any patch: the attention pass sees what the loop fed
            mask, position = _grow(mask), position + 1
            if isolated is not None and step > 0:
                mask[isolated.to(mask.device), -2] = 0  # hide the previous thought (earlier ones already are)
            with patch.during(self.lm, step) if patch is not None else contextlib.nullcontext():
                out = self._forward(
                    inputs_embeds=z, attention_mask=mask, position_ids=position, cache=cache, hidden=True
                )
            latent.append(_last_position(out.hidden_states))  # (B, S, d)
            cache = _cache_of(out)
        return LatentLoop(ids, positions, bot, latent, inputs, mask, position, cache)

    def feed(self, embeds: torch.Tensor, loop: LatentLoop, hidden: bool = False) -> Any:
        """Forward ``embeds`` (B, m, d) after the loop's context (with its cache), all logits kept."""
        width = embeds.shape[1]
        mask = torch.cat([loop.mask, loop.mask.new_ones(loop.mask.shape[0], width)], dim=1)  # (B, n+T+m)
        position = loop.position + torch.arange(1, width + 1, device=loop.position.device)  # (B, m)
        inputs = {"cache" if "cache" in self._arguments else "past_key_values": loop.cache}
        return self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=position, use_cache=True,
                       output_hidden_states=hidden, **inputs)

    def _attention(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, thoughts: torch.Tensor
    ) -> torch.Tensor:
        """Attention weights of bot and every thought over its context, from one eager pass over the sequence.

        The loop's own passes keep the model's attention implementation (sdpa by default), whose states
        differ from eager attention's in the last bits; so the weights come from a separate pass over the
        question, bot and the loop's very thought inputs, and recording them leaves the states as they were.

        Args:
            ids: ``(B, n)`` left-padded question and bot ids.
            mask: ``(B, n + T)`` the loop's attention mask after its T steps.
            positions: ``(B, n)`` the question's and bot's position ids.
            thoughts: ``(B, T, d)`` the loop's latent inputs ``z``.

        Returns:
            ``(B, L, H, T+1, n+T)`` weights on the CPU, in the model's dtype: rows are the thoughts, then bot.
        """
        n, steps = ids.shape[1], thoughts.shape[1]
        embeds = torch.cat([self.lm.get_input_embeddings()(ids), thoughts], dim=1)  # (B, n+T, d)
        after = positions[:, -1:] + torch.arange(1, steps + 1, device=positions.device)  # (B, T)
        inputs: dict[str, Any] = {"position_ids": torch.cat([positions, after], dim=1)}  # (B, n+T)
        if "logits_to_keep" in self._arguments:
            inputs["logits_to_keep"] = 1
        rows = [*range(n, n + steps), n - 1]  # the thoughts' queries, then bot's
        with _eager_attention(self.lm):
            out = self.lm(inputs_embeds=embeds, attention_mask=mask, use_cache=False, output_attentions=True, **inputs)
        return torch.stack([layer[:, :, rows] for layer in out.attentions], dim=1).cpu()  # (B, L, H, T+1, n+T)

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


@contextlib.contextmanager
def _eager_attention(lm: Any) -> Iterator[None]:
    """Switch ``lm`` to eager attention (the implementation that returns its weights) and back."""
    before = lm.config._attn_implementation
    lm.set_attn_implementation("eager")
    try:
        yield
    finally:
        lm.set_attn_implementation(before)


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


def final_norm(lm: Any) -> nn.Module:
    """The model's final norm (LLaMA's ``norm``, GPT-2's ``ln_f``), whose output is the last hidden state.

    Raises:
        ModelError: The model has none that ctexp knows.
    """
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
    merged = load_merged_lm(files, device, dtype, lora_r, lora_alpha)
    prj = Projection.from_weights(merged.prj, merged.hidden).to(device=device, dtype=dtype).eval()
    return CodiModel(
        merged.lm.eval().requires_grad_(False),
        prj.requires_grad_(False),
        merged.vocab,
        _eos_ids(files.base, tokenizer, merged.config, merged.vocab),
    )


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
