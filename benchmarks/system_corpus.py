"""A 4-version corpus with strong shifts between versions, from text every Linux machine has.

The law benchmark needs versions whose data really differ, and data that is not the embedded
default corpus (:mod:`raypath.corpus`: Python source, docstrings, the Python test suite).
Every Linux machine that runs Python carries other kinds of text in its system directories;
each version is one kind, so every version boundary is a change of language:

* ``v1`` licences -- English legal prose: ``/usr/share/common-licenses``,
  ``/usr/share/licenses``, ``/usr/share/doc/*/copyright`` and the licence files of the
  installed Python distributions (``*.dist-info/LICENSE*``, Python's own ``LICENSE.txt``);
* ``v2`` manual pages -- roff markup (``/usr/share/man``, gzip-decompressed); where they were
  stripped (slim containers), the packages' changelogs in ``/usr/share/doc``;
* ``v3`` C headers -- ``/usr/include`` (else the interpreter's own headers);
* ``v4`` shell scripts -- files under ``/usr/bin``, ``/usr/sbin``, ``/etc`` that start with
  a ``sh``/``bash``/``dash`` shebang.

Nothing is downloaded. Identical texts (the same licence in many packages) count once. The
build is deterministic for a given machine (sorted walks, seeded sampling and splitting;
:mod:`raypath.corpus`'s helpers) and writes the layout raypath reads as ``data.corpus``::

    out_dir/vK/train/part-000.jsonl   out_dir/vK/val/part-000.jsonl   out_dir/corpus.json

    python benchmarks/system_corpus.py runs/system_corpus
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import site
import sys
import sysconfig
from pathlib import Path
from typing import Callable, Iterator

from raypath.corpus import MANIFEST_NAME, PART_NAME, Document, _chunk, _jsonl_bytes, _sample, _split
from raypath.storage import atomic_write_bytes

#: Largest document (characters): long files are cut at line boundaries.
DOC_CHARS = 4000
#: Largest file read (bytes): bigger ones are generated tables, not text.
MAX_FILE_BYTES = 400_000
SHELLS = (b"#!/bin/sh", b"#!/bin/bash", b"#!/usr/bin/env bash", b"#!/usr/bin/env sh", b"#!/bin/dash")


def _files(roots: list[Path], pattern: str) -> Iterator[Path]:
    for root in roots:
        if root.is_dir():
            yield from (p for p in sorted(root.glob(pattern)) if p.is_file() and not p.is_symlink())


def _text(path: Path) -> str | None:
    """The file's text: gzip-decompressed, UTF-8, not too big; None otherwise."""
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
        return raw[:MAX_FILE_BYTES].decode("utf-8") if len(raw) <= MAX_FILE_BYTES else None
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
        return None


def _licences() -> Iterator[Path]:
    share = Path("/usr/share")
    yield from _files([share / "common-licenses", share / "licenses"], "**/*")
    yield from _files([share / "doc"], "*/copyright")
    yield from _files([Path(sys.base_prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"],
                      "LICENSE.txt")
    yield from _files([Path(p) for p in site.getsitepackages()], "*.dist-info/LICENSE*")


def _manuals() -> Iterator[Path]:
    pages = list(_files([Path("/usr/share/man")], "man*/*"))
    yield from pages or _files([Path("/usr/share/doc")], "*/changelog*")


def _headers() -> Iterator[Path]:
    headers = list(_files([Path("/usr/include")], "**/*.h"))
    yield from headers or _files([Path(sysconfig.get_paths()["include"])], "**/*.h")


def _scripts() -> Iterator[Path]:
    for path in _files([Path("/usr/bin"), Path("/usr/sbin"), Path("/etc")], "**/*"):
        try:
            with path.open("rb") as f:
                head = f.read(32)
        except OSError:
            continue
        if head.startswith(SHELLS):
            yield path


#: version -> (kind of text, where it comes from)
SOURCES: dict[str, tuple[str, Callable[[], Iterator[Path]]]] = {
    "v1": ("licences (English legal prose)", _licences),
    "v2": ("manual pages (roff markup)", _manuals),
    "v3": ("C headers", _headers),
    "v4": ("shell scripts", _scripts),
}


def _documents(paths: Iterator[Path]) -> list[Document]:
    docs, seen = [], set()
    for path in paths:
        text = _text(path)
        if not text or not text.strip():
            continue
        digest = hashlib.sha256(text.encode()).digest()
        if digest in seen:
            continue
        seen.add(digest)
        docs.extend(Document(chunk, str(path)) for chunk in _chunk(text, DOC_CHARS) if chunk.strip())
    return docs


def build_system_corpus(out_dir: str | Path, *, max_docs: int = 150, max_chars: int = 400_000,
                        val_fraction: float = 0.1, seed: int = 0) -> Path:
    """Write the 4 versions under ``out_dir`` (at most ``max_docs`` documents and
    ``max_chars`` characters each, ``val_fraction`` of them held out for validation)."""
    out = Path(out_dir)
    versions = {}
    for index, (version, (kind, find)) in enumerate(SOURCES.items()):
        rng = random.Random(f"{seed}:{index}")
        docs = _documents(find())
        if len(docs) < 10:
            raise RuntimeError(f"{version} ({kind}): only {len(docs)} documents on this machine")
        chosen = _sample(docs, max_docs, max_chars, rng)
        train, val = _split(chosen, val_fraction, rng)
        info = {"kind": kind, "available_docs": len(docs),
                "roots": sorted({str(Path(d.source).parent) for d in chosen})[:20]}
        for split, split_docs in (("train", train), ("val", val)):
            data = _jsonl_bytes(split_docs)
            atomic_write_bytes(out / version / split / PART_NAME, data)
            info[f"{split}_docs"] = len(split_docs)
            info[f"{split}_chars"] = sum(len(d.text) for d in split_docs)
        versions[version] = info
    manifest = {"source": "system text of this machine (benchmarks/system_corpus.py)",
                "parameters": {"max_docs": max_docs, "max_chars": max_chars, "val_fraction": val_fraction,
                               "seed": seed, "doc_chars": DOC_CHARS},
                "versions": versions}
    atomic_write_bytes(out / MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--docs", type=int, default=150, help="most documents per version")
    p.add_argument("--chars", type=int, default=400_000, help="most characters per version")
    args = p.parse_args(argv)
    out = build_system_corpus(args.out_dir, max_docs=args.docs, max_chars=args.chars)
    print((out / MANIFEST_NAME).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
