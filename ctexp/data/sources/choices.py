"""Choices of the real-data commands, kept free of torch so that the CLI starts fast."""

from __future__ import annotations

from enum import IntEnum, StrEnum


class Precision(StrEnum):
    """The dtype an extraction runs in, and writes the store's hidden states in."""

    BF16 = "bf16"  # what CODI runs in
    FP32 = "fp32"


class NormKind(StrEnum):
    """The kind of a model's final norm."""

    RMSNORM = "rmsnorm"
    LAYERNORM = "layernorm"


class AttentionMode(StrEnum):
    """What ``ctexp extract --attention`` keeps of the attention weights (``ctexp.data.attention``)."""

    MEAN = "mean"  # averaged over heads, float32
    HEADS = "heads"  # every head, in the extraction's dtype


class ContextKind(IntEnum):
    """What a context slot of an attention file is (``ctexp.data.attention``); the values are stored in ``kinds``.

    Here rather than beside the file's reader so that the attention report's records, which the registry
    reads, load without torch.
    """

    PAD = 0
    START = 1  # the tokenizer's BOS (LLaMA adds one; attention sinks gather there)
    NUMBER = 2
    OPERATOR = 3
    WORD = 4  # any other question token
    BOT = 5
    THOUGHT = 6
