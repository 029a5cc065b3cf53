"""Tiny random CODI checkpoints (LLaMA and GPT-2 layouts, LoRA and prj) for the tests that run a model.

``make_assets`` saves a base directory (config and a tiny BPE tokenizer) and checkpoints in CODI's layout
(PEFT LoRA keys, prj) under a directory; ``run_extract`` extracts a store from one of them;
``reference_thoughts`` is a deliberately plain CODI loop (whole sequence at every step, one problem, no
cache, mask or padding) that the real loop is checked against. ``Shape`` sizes a checkpoint: the tests'
tiny one by default, ``LLAMA_1B`` for ``bench/seed_scale.py`` (LLaMA-3.2-1B's shape, random weights).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ctexp.model.extraction import extract, make_config

T = 6
R, ALPHA = 4, 8.0
PRJ_DIM = 24
MAX_ANSWER = 5
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GPT2_TARGETS = ("c_attn", "c_proj", "c_fc")
PREFIX = "codi.base_model.model."

QUESTIONS = [
    "Tom has 3 apples.",
    "Sara buys 12 pens at 2 dollars each and 4 books at 7 dollars each. How much does she pay in total?",
    "A box has 48 eggs. Half are sold. How many are left?",
    "Ben runs 5 miles a day for 6 days.",
    "There are 9 rows of 6000 chairs in the hall, and each chair costs 1 dollar to clean. How much does cleaning cost?",
    "Ann had 4 cats, lost 1, then tripled them. Then she gave 2 away and doubled the rest. How many now?",
    "Kim reads 30 pages.",
    "A car goes 60 miles an hour for 3 hours.",
    "Lee earns 15 dollars an hour and works 8 hours a day, 5 days a week. What does he earn each week?",
    "Max has 7 coins and finds 8 more.",
    "A shop sells 100 cakes a day at 3 dollars.",
    "Jo has 2 dogs.",
]
STEPS = [
    ["3+4=7"],
    ["12*2=24", "4*7=28", "24+28=52"],
    ["48/2=24"],
    ["5*6=30"],
    ["9*6000=54000"],
    ["4-1=3", "3*3=9", "9-2=7", "7*2=14"],
    ["30+0=30"],
    ["60*3=180"],
    ["15*8=120", "120*5=600"],
    ["7+8=15"],
    ["100*3=300"],
    ["2+0=2"],
]


# --- tokenizer, base models, CODI checkpoints -------------------------------------------------------


def write_gsm8k(path: Path) -> Path:
    with path.open("w") as handle:
        for question, steps in zip(QUESTIONS, STEPS, strict=True):
            body = " ".join(f"<<{step}>>{step.split('=')[1]}" for step in steps)
            handle.write(json.dumps({"question": question, "answer": f"{body}\n#### {steps[-1].split('=')[1]}"}) + "\n")
    return path


@dataclass(frozen=True)
class Shape:
    """A checkpoint's size. ``vocab`` None: the tokenizer's; else the model's (larger than the tokenizer's)."""

    hidden: int = 32
    intermediate: int = 48
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vocab: int | None = None
    lora_r: int = R
    prj_dim: int = PRJ_DIM
    tokenizer_vocab: int = 300


TINY = Shape()
LLAMA_1B = Shape(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, vocab=128_256, lora_r=128,
                 prj_dim=2048, tokenizer_vocab=4000)


def build_tokenizer(
    directory: Path, bos: bool, texts: list[str] | None = None, vocab_size: int = 300, size: int | None = None
) -> int:
    """A small byte-level BPE tokenizer trained on the questions (and ``texts``); LLaMA-like ones add BOS.

    ``size``: pad its vocabulary with reserved tokens (never produced by encoding) to this many ids,
    so that every id a model of that vocabulary predicts decodes.
    """
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    raw.train_from_iterator(
        (texts or []) + QUESTIONS + [" ".join(s) for s in STEPS] + ["The answer is: 42"], trainer
    )
    if size is not None and size > raw.get_vocab_size():
        spec = json.loads(raw.to_str())
        vocab = spec["model"]["vocab"]
        vocab.update({f"<|reserved_{i}|>": i for i in range(len(vocab), size)})
        raw = Tokenizer.from_str(json.dumps(spec))
    if bos:
        raw.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", raw.token_to_id("<s>"))]
        )
    wrapped = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>")
    wrapped.save_pretrained(directory)
    return len(wrapped)


@dataclass
class Codi:
    """A tiny CODI checkpoint and its reference (merged) model."""

    kind: str
    base: Path
    vocab: int
    reference: torch.nn.Module
    prj: dict[str, torch.Tensor]
    eos: int


def base_config(kind: str, vocab: int, shape: Shape = TINY):
    from transformers import GPT2Config, LlamaConfig

    if kind == "llama":
        return LlamaConfig(
            vocab_size=vocab,
            hidden_size=shape.hidden,
            intermediate_size=shape.intermediate,
            num_hidden_layers=shape.layers,
            num_attention_heads=shape.heads,
            num_key_value_heads=shape.kv_heads,
            max_position_embeddings=512,
            bos_token_id=0,
            eos_token_id=1,
            tie_word_embeddings=True,
        )
    return GPT2Config(vocab_size=vocab, n_embd=shape.hidden, n_layer=shape.layers, n_head=shape.heads, n_positions=512,
                      bos_token_id=1, eos_token_id=1)


def make_codi(
    root: Path, kind: str, seed: int = 0, shape: Shape = TINY, texts: list[str] | None = None
) -> tuple[Codi, dict[str, torch.Tensor]]:
    """Save a base directory (config + tokenizer) and return the CODI state dict and reference model.

    ``shape`` sizes the model (and LoRA rank and prj); ``texts`` are more text to train the tokenizer on.
    """
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    base = root / f"{kind}-base"
    vocab = build_tokenizer(base, bos=kind == "llama", texts=texts, vocab_size=shape.tokenizer_vocab, size=shape.vocab)
    base_config(kind, vocab, shape).save_pretrained(base)
    config = base_config(kind, vocab + 3, shape)
    config.tie_word_embeddings = False
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # larger weights than the 0.02 init, so that every state carries signal
        for param in model.parameters():
            param.mul_(2.0 if param.dim() > 1 else 1.0)
    targets = LLAMA_TARGETS if kind == "llama" else GPT2_TARGETS
    modules = {name: m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in targets}
    state: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        module, _, leaf = key.rpartition(".")
        wrapped = f"{module}.base_layer.{leaf}" if module in modules else key
        state[PREFIX + wrapped] = value.detach().clone()
    if kind == "gpt2":  # GPT-2 ties its head: a safetensors save keeps the embedding only
        del state[PREFIX + "lm_head.weight"]
        with torch.no_grad():
            model.lm_head.weight.copy_(model.transformer.wte.weight)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, module in modules.items():
            conv = isinstance(module, Conv1D)
            in_features, out_features = module.weight.shape if conv else module.weight.shape[::-1]
            rank = shape.lora_r
            a = torch.randn(rank, in_features, generator=generator) * 0.1  # (r, in)
            b = torch.randn(out_features, rank, generator=generator) * 0.1  # (out, r)
            state[f"{PREFIX}{name}.lora_A.default.weight"] = a
            state[f"{PREFIX}{name}.lora_B.default.weight"] = b
            delta = (b @ a) * (ALPHA / rank)  # (out, in)
            module.weight += delta.T if conv else delta
    d, width = shape.hidden, shape.prj_dim
    prj = {
        "1.weight": torch.randn(width, d, generator=generator) * 0.3,
        "1.bias": torch.randn(width, generator=generator) * 0.1,
        "3.weight": torch.randn(d, width, generator=generator) * 0.3,
        "3.bias": torch.randn(d, generator=generator) * 0.1,
        "ln.weight": 1 + 0.1 * torch.randn(d, generator=generator),
        "ln.bias": 0.1 * torch.randn(d, generator=generator),
    }
    state.update({f"prj.{k}": v for k, v in prj.items()})
    return Codi(kind, base, vocab, model, prj, eos=1), state


def save_checkpoint(state: dict[str, torch.Tensor], directory: Path, fmt: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    else:
        torch.save(state, directory / "pytorch_model.bin")
    return directory


@dataclass
class Assets:
    root: Path
    data: Path
    llama: Codi
    llama_dir: Path  # safetensors
    llama_bin: Path  # the same weights as pytorch_model.bin
    llama_state: dict[str, torch.Tensor]
    gpt2: Codi
    gpt2_dir: Path  # pytorch_model.bin, head tied to the embedding


def make_assets(root: Path) -> Assets:
    """Build the tiny LLaMA (safetensors and .bin) and GPT-2 (.bin) checkpoints and the problems under ``root``."""
    llama, llama_state = make_codi(root, "llama")
    gpt2, gpt2_state = make_codi(root, "gpt2", seed=3)
    return Assets(
        root=root,
        data=write_gsm8k(root / "train.jsonl"),
        llama=llama,
        llama_dir=save_checkpoint(llama_state, root / "llama-st", "safetensors"),
        llama_bin=save_checkpoint(llama_state, root / "llama-bin", "torch"),
        llama_state=llama_state,
        gpt2=gpt2,
        gpt2_dir=save_checkpoint(gpt2_state, root / "gpt2-bin", "torch"),
    )


def run_extract(assets: Assets, model_dir: Path, codi: Codi, out: Path, progress=None, **settings):
    values = dict(  # noqa: C408 - keyword form reads like the command's flags
        model=model_dir,
        base=codi.base,
        data=f"gsm8k:{assets.data}",
        dtype="fp32",
        lora_r=R,
        lora_alpha=ALPHA,
        max_answer_tokens=MAX_ANSWER,
        batch_size=4,
        positions=T,
    )
    values.update(settings)
    return extract(make_config(**values), out, torch.device("cpu"), progress=progress)


# --- the reference: whole sequence at every step, one problem, no cache --------------------------


def reference_prj(prj: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    z = torch.nn.functional.linear(
        torch.nn.functional.gelu(torch.nn.functional.linear(h, prj["1.weight"], prj["1.bias"])),
        prj["3.weight"],
        prj["3.bias"],
    )
    return torch.nn.functional.layer_norm(z, (z.shape[-1],), prj["ln.weight"], prj["ln.bias"], 1e-5)


@torch.no_grad()
def reference_thoughts(
    codi: Codi, tokenizer, question: str, feedback: Mapping[int, torch.Tensor] | None = None
) -> tuple[torch.Tensor, list[int]]:
    """(S, T+1, d) states (bot last) and the greedy answer ids, the plain way.

    ``feedback`` maps a position p to the vector fed after it in place of ``prj(h_p)`` (an intervention).
    """
    feedback = feedback or {}
    model, embed, V = codi.reference, codi.reference.get_input_embeddings(), codi.vocab
    sequence = embed(torch.tensor([tokenizer(question)["input_ids"] + [V + 1]]))  # (1, n, d)

    def last_states() -> torch.Tensor:
        out = model(inputs_embeds=sequence, output_hidden_states=True, use_cache=False)
        return torch.stack([h[0, -1] for h in out.hidden_states])  # (S, d)

    bot = last_states()
    states = []
    for step in range(T):
        z = feedback[step - 1] if step - 1 in feedback else reference_prj(codi.prj, (states[-1] if states else bot)[-1])
        sequence = torch.cat([sequence, z.view(1, 1, -1)], dim=1)
        states.append(last_states())
    sequence = torch.cat([sequence, embed(torch.tensor([[V + 2]]))], dim=1)
    answer: list[int] = []
    for _ in range(MAX_ANSWER):
        token = int(model(inputs_embeds=sequence, use_cache=False).logits[0, -1, :V].argmax())
        if token == codi.eos:
            break
        answer.append(token)
        sequence = torch.cat([sequence, embed(torch.tensor([[token]]))], dim=1)
    return torch.stack([*states, bot], dim=1), answer  # (S, T+1, d)
