"""Byte-level BPE tokenizer: training, loading and a text iterator over corpus files.

The tokenizer is trained once (on version 1's train split) and then frozen for
all later versions: path switching compares models across data versions, which
is only meaningful when every version is tokenized the same way.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)
# Records how a saved tokenizer was trained, so a cached directory trained
# with another vocab size is not silently reused.
TRAIN_INFO_NAME = "raypath_tokenizer.json"
SUPPORTED_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet", ".arrow")


# --------------------------------------------------------------------------- #
# Text iteration
# --------------------------------------------------------------------------- #


def _is_supported(path: Path) -> bool:
    return path.name.endswith(SUPPORTED_SUFFIXES)


def _expand(files: str | Path | Iterable[str | Path]) -> list[Path]:
    """Accept one path or many; directories expand to their data files, sorted."""
    items = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    out: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            out.extend(sorted((p for p in path.rglob("*") if p.is_file() and _is_supported(p)), key=str))
        elif not path.is_file():
            raise FileNotFoundError(f"corpus file not found: {path}")
        elif not _is_supported(path):
            raise ValueError(f"unsupported corpus file {path}: expected one of {SUPPORTED_SUFFIXES}")
        else:
            out.append(path)
    return out


def iter_texts(
    files: str | Path | Iterable[str | Path],
    text_column: str = "text",
    max_chars: int | None = None,
) -> Iterator[str]:
    """Yield ``text_column`` from corpus files (see :mod:`raypath.sources`), in order.

    ``max_chars`` bounds the total characters yielded (the last text is
    truncated to fit), e.g. to cap tokenizer-training cost on big corpora.
    """
    from raypath.sources import iter_texts as read

    yield from read([str(p) for p in _expand(files)], text_column, max_chars=max_chars)


# --------------------------------------------------------------------------- #
# Training / loading
# --------------------------------------------------------------------------- #


def _build_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Offsets only; no BOS/EOS insertion - the data pipeline places EOS itself.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 byte symbols up front, so any input (unseen unicode
        # included) round-trips instead of hitting unknown tokens.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        # The default clean-up rewrites " ." -> "." etc., which breaks
        # decode(encode(x)) == x for code.
        clean_up_tokenization_spaces=False,
    )


def _check_existing(out: Path, vocab_size: int) -> PreTrainedTokenizerFast:
    info_path = out / TRAIN_INFO_NAME
    if info_path.is_file():
        recorded = json.loads(info_path.read_text(encoding="utf-8")).get("vocab_size")
        if recorded != vocab_size:
            raise ValueError(
                f"tokenizer at {out} was trained with vocab_size={recorded}, "
                f"requested {vocab_size}; use another out_dir or delete it"
            )
    logger.info("reusing tokenizer at %s", out)
    return load_tokenizer(out)


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` and save it to ``out_dir``.

    If ``out_dir`` already holds a tokenizer it is loaded instead (``texts`` is
    not consumed). The save is atomic: a temp sibling directory is renamed
    into place, so concurrent trainers never expose a half-written directory.
    """
    if vocab_size <= len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size must exceed {len(SPECIAL_TOKENS) + 256} (bytes + specials), got {vocab_size}")
    out = Path(out_dir)
    if (out / "tokenizer.json").is_file():
        return _check_existing(out, vocab_size)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not a tokenizer directory")

    tokenizer = _wrap(_build_bpe(texts, vocab_size))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{uuid.uuid4().hex[:8]}-", dir=out.parent))
    try:
        tokenizer.save_pretrained(str(tmp))
        (tmp / TRAIN_INFO_NAME).write_text(json.dumps({"vocab_size": vocab_size}) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        os.rename(tmp, out)
    except OSError:
        # Lost a race against another trainer: theirs is equivalent, use it.
        if (out / "tokenizer.json").is_file():
            return _check_existing(out, vocab_size)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("trained tokenizer with %d tokens -> %s", len(tokenizer), out)
    return tokenizer


def encode_documents(tok: PreTrainedTokenizerFast, texts: list[str]) -> list[list[int]]:
    """Token ids of each document's text, never a special token's id.

    A document may quote ``<|endoftext|>`` (code, docs about tokenizers): matched as the
    special token it would become a document boundary the data pipeline did not place.
    Split, it is plain bytes and still decodes back to the text.
    """
    return tok(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def is_tokenizer_file(name: str) -> bool:
    """Whether a file of a tokenizer directory is one a tokenizer loads (``tokenizer.json``,
    its config, special tokens, a chat template, BPE vocabularies), not a model's weights: a
    base model's directory is the tokenizer's when the run continued it (``model.path``)."""
    return name.startswith(("tokenizer", "chat_template")) or name in (
        "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt")


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved by :func:`train_tokenizer` from a local directory."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer at {path}: expected a directory containing tokenizer.json")
    return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
