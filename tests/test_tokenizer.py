"""Tests for the byte-level BPE tokenizer (raypath.tokenizer)."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raypath.corpus import build_embedded_corpus
from raypath.tokenizer import EOS_TOKEN, PAD_TOKEN, encode_documents, iter_texts, load_tokenizer, train_tokenizer

VOCAB = 1024
SAMPLES = [
    "def f(x: int) -> int:\n    return x ** 2  # squared\n\n\tif x != 0 :\n        pass\r\n",
    "The quick brown fox , jumps . over the lazy dog ; isn't it ?",
    "Unicode: naïve café, Ωμέγα, 日本語のテキスト, emoji 🚀🐍 and a zero-width\u200bjoiner.",
    "  leading and trailing spaces  ",
]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_embedded_corpus(tmp_path_factory.mktemp("corpus"), max_docs_per_version=40)


@pytest.fixture(scope="module")
def v1_train(corpus_dir: Path) -> Path:
    return corpus_dir / "v1" / "train" / "part-000.jsonl"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory, v1_train: Path) -> Path:
    out = tmp_path_factory.mktemp("tok") / "bpe"
    train_tokenizer(iter_texts([v1_train]), VOCAB, out)
    return out


def test_vocab_size_and_special_tokens(tok_dir: Path) -> None:
    tok = load_tokenizer(tok_dir)
    # BpeTrainer counts the specials inside vocab_size.
    assert VOCAB - 2 <= len(tok) <= VOCAB + 2
    assert tok.eos_token == EOS_TOKEN and tok.bos_token == EOS_TOKEN
    assert tok.eos_token_id is not None and tok.eos_token_id == tok.bos_token_id
    assert tok.pad_token == PAD_TOKEN and tok.pad_token_id not in (None, tok.eos_token_id)
    assert tok.convert_ids_to_tokens(tok.eos_token_id) == EOS_TOKEN
    # No implicit BOS/EOS: the data pipeline places EOS itself.
    assert EOS_TOKEN not in tok.convert_ids_to_tokens(tok.encode("x = 1"))


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tok_dir: Path, text: str) -> None:
    tok = load_tokenizer(tok_dir)
    ids = tok.encode(text)
    assert tok.decode(ids) == text


def test_document_text_never_encodes_to_special_ids(tok_dir: Path) -> None:
    tok = load_tokenizer(tok_dir)
    text = f'text.split("{EOS_TOKEN}") and padding with {PAD_TOKEN}'
    (ids,) = encode_documents(tok, [text])
    # Only the data pipeline places EOS; one from the text would be a fake document boundary.
    assert tok.eos_token_id not in ids and tok.pad_token_id not in ids
    assert tok.decode(ids) == text
    assert tok.convert_tokens_to_ids(EOS_TOKEN) == tok.eos_token_id  # the real one is still there to place


def test_bpe_actually_compresses_code(tok_dir: Path, corpus_dir: Path) -> None:
    tok = load_tokenizer(tok_dir)
    text = "".join(iter_texts([corpus_dir / "v1" / "val"], max_chars=20_000))
    n_ids = len(tok.encode(text))
    # Merges learned on v1 should give well over 2 chars/token on held-out v1.
    assert len(text) / n_ids > 2.0


def test_returned_and_reloaded_encode_identically(tmp_path: Path, v1_train: Path) -> None:
    trained = train_tokenizer(iter_texts([v1_train], max_chars=300_000), 512, tmp_path / "t")
    reloaded = load_tokenizer(tmp_path / "t")
    for text in SAMPLES:
        assert trained.encode(text) == reloaded.encode(text)
    assert trained.get_vocab() == reloaded.get_vocab()


def test_training_is_deterministic(tmp_path: Path, v1_train: Path) -> None:
    texts = list(iter_texts([v1_train], max_chars=300_000))
    train_tokenizer(texts, 600, tmp_path / "a")
    train_tokenizer(texts, 600, tmp_path / "b")
    assert (tmp_path / "a/tokenizer.json").read_bytes() == (tmp_path / "b/tokenizer.json").read_bytes()


def test_existing_dir_is_loaded_not_retrained(tok_dir: Path) -> None:
    def explode() -> Iterator[str]:
        raise AssertionError("texts must not be consumed when out_dir exists")
        yield ""

    before = (tok_dir / "tokenizer.json").stat().st_mtime_ns
    tok = train_tokenizer(explode(), VOCAB, tok_dir)
    assert len(tok) == len(load_tokenizer(tok_dir))
    assert (tok_dir / "tokenizer.json").stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(explode(), VOCAB * 2, tok_dir)


def test_no_temp_dirs_left(tok_dir: Path) -> None:
    assert [p.name for p in tok_dir.parent.iterdir()] == [tok_dir.name]


def test_bad_paths_raise_file_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "does-not-exist"
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load_tokenizer(missing)
    empty = tmp_path / "empty-dir"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty-dir"):
        load_tokenizer(empty)


def test_vocab_too_small_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        train_tokenizer(["abc"], 100, tmp_path / "x")


def test_iter_texts_formats_and_budget(tmp_path: Path) -> None:
    rows = [{"text": "alpha", "source": "a"}, {"text": "beta", "source": "b"}, {"text": "gamma", "source": "c"}]
    jl = tmp_path / "d" / "a.jsonl"
    jl.parent.mkdir()
    jl.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]) + "\n", encoding="utf-8")
    gz = tmp_path / "d" / "b.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as fh:
        fh.write(json.dumps(rows[2]) + "\n")
    pqf = tmp_path / "d" / "c.parquet"
    pq.write_table(pa.table({"body": ["delta", None, "épsilon"]}), pqf)

    assert list(iter_texts([jl, gz])) == ["alpha", "beta", "gamma"]
    assert list(iter_texts([pqf], text_column="body")) == ["delta", "épsilon"]
    # A directory expands to its data files in sorted order.
    assert list(iter_texts(tmp_path / "d", text_column="text", max_chars=7)) == ["alpha", "be"]
    with pytest.raises(ValueError, match="a.jsonl: line 1: no 'body' string field"):
        list(iter_texts([jl], text_column="body"))
    with pytest.raises(FileNotFoundError):
        list(iter_texts([tmp_path / "nope.jsonl"]))


def test_iter_texts_names_a_lone_surrogate(tmp_path: Path) -> None:
    # Tokenizer training would otherwise die in a UnicodeEncodeError naming no file.
    jl = tmp_path / "s.jsonl"
    jl.write_bytes(b'{"text": "fine"}\n{"text": "broken \\ud800 escape"}\n')
    with pytest.raises(ValueError, match=r"s.jsonl: line 2: text is not valid Unicode \(lone surrogate U\+D800"):
        list(iter_texts([jl]))
