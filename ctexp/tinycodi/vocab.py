"""The tiny model's tokenizer: one token per character, saved as a local Hugging Face tokenizer directory.

Every character a problem uses (digits, ``+ - * =`` and the space) is its own token, so a CoT step's
tokens are its characters and ``ctexp align`` splits them exactly. ``<s>`` (BOS, added to a question as
a LLaMA tokenizer adds it) and ``</s>`` (EOS, which ends an answer) come first; CODI's three special ids
(pad, bot, eot) follow the vocabulary in the model, not in the tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

BOS, EOS = "<s>", "</s>"
CHARACTERS = "0123456789+-*= "
TOKENS = (BOS, EOS, *CHARACTERS)
BOS_ID, EOS_ID = 0, 1
VOCAB = len(TOKENS)


def encode(text: str) -> list[int]:
    """Ids of ``text``, one per character, without BOS (how steps and answers are fed)."""
    return [TOKENS.index(c) for c in text]


def question_ids(question: str) -> list[int]:
    """The question as ``ctexp extract`` tokenizes it: BOS, then one id per character."""
    return [BOS_ID, *encode(question)]


def build_tokenizer() -> Any:
    """The tokenizer as a transformers ``PreTrainedTokenizerFast`` (its ids equal ``encode``'s)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({token: i for i, token in enumerate(TOKENS)}, unk_token=EOS))
    raw.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    raw.decoder = decoders.Fuse()  # characters join without spaces between them
    raw.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, BOS_ID)])
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=BOS, eos_token=EOS)


def save_tokenizer(directory: Path) -> None:
    """Write the tokenizer's files (``tokenizer.json``, ``tokenizer_config.json``, ...) into ``directory``."""
    build_tokenizer().save_pretrained(directory)
