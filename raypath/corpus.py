"""The embedded default corpus: four dataset versions with a real distribution shift.

Why this corpus
---------------
Learning-rate path switching is about what happens when a model trained on one
version of the data is continued on the next version. To study that without a
network connection (Ray workers and CI machines often have none) we need data
that (a) every machine already has, (b) is real text rather than synthetic
noise, and (c) shifts in a way a language model actually notices. The Python
interpreter that runs this code ships exactly such text:

* ``v1`` - Python source of stdlib modules/packages named ``a``-``l``
* ``v2`` - Python source of stdlib modules/packages named ``m``-``z``
  (same language as v1 but different vocabularies: asyncio/email/http vs.
  multiprocessing/tkinter/xml ... - a mild, "new topics" shift)
* ``v3`` - English prose: stdlib docstrings extracted with :mod:`ast` plus the
  ``pydoc_data.topics`` language-reference texts (a strong code -> prose shift)
* ``v4`` - the stdlib regression test suite (``test/test_*.py``), i.e. code
  again but in a different register (asserts, fixtures, literals); falls back
  to the interpreter's C headers when the test suite was stripped (e.g. slim
  Docker images, Debian without ``libpython3-testsuite``).

v3's docstrings are also text inside v1's and v2's source files: drawn at random, 47% of the
full corpus's v3 validation lines (of at least 30 characters) occurred verbatim in v1/v2
train text, so the main path would have trained on v3's held-out text before v3 arrived.
Held-out documents are therefore drawn only from source files none of whose documents has
more than :data:`HELD_OUT_MAX_SEEN` of its lines in an earlier version's train split
(``benchmarks/corpus_overlap.py``, docs/results.md). Versions with no such document (every
100-document sample, ``configs/quickstart.yaml``) split exactly as a plain random draw would.

The on-disk layout is also the layout users bring their own corpora in::

    out_dir/v1/train/part-000.jsonl   out_dir/v1/val/part-000.jsonl
    ...                                ...
    out_dir/v4/train/part-000.jsonl   out_dir/v4/val/part-000.jsonl
    out_dir/corpus.json               (manifest, written last)

Each jsonl line is ``{"text": ..., "source": <path relative to the stdlib>}``.
The build is deterministic for a given interpreter (sorted walks, seeded
sampling/splitting), idempotent (a matching ``corpus.json`` short-circuits it)
and atomic per file (temp file + :func:`os.replace`).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import logging
import random
import sys
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from raypath.sources import unicode_problem
from raypath.storage import atomic_write_bytes

logger = logging.getLogger(__name__)

# Bump when the selection/format logic changes so old manifests stop matching.
FORMAT_VERSION = 1
#: A document with more than this share of its lines (of at least OVERLAP_MIN_CHARS characters,
#: stripped) in an earlier version's train split is never held out, nor is its source file.
HELD_OUT_MAX_SEEN = 0.25
OVERLAP_MIN_CHARS = 30
MANIFEST_NAME = "corpus.json"
PART_NAME = "part-000.jsonl"
VERSIONS = ("v1", "v2", "v3", "v4")
MAX_DOC_CHARS = 20_000
# The test suite alone is ~15 MB; cap every version so they stay comparable
# in size (and a build stays a few seconds).
MAX_CHARS_PER_VERSION = 5_000_000

# Top-level stdlib entries that are not "ordinary library source":
# tests/tools/vendored code, generated tables (encodings' codec maps,
# _sysconfigdata), binary dirs, and pydoc_data (which is prose and goes to v3).
_EXCLUDED_TOP = frozenset(
    {
        "test",
        "idlelib",
        "lib2to3",
        "site-packages",
        "dist-packages",
        "__pycache__",
        "lib-dynload",
        "ensurepip",
        "encodings",
        "pydoc_data",
    }
)


@dataclass(frozen=True)
class Document:
    text: str
    source: str


@dataclass
class _Stats:
    skipped_non_utf8: int = 0
    skipped_unparsable: int = 0


# --------------------------------------------------------------------------- #
# File discovery
# --------------------------------------------------------------------------- #


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _include_dir() -> Path | None:
    inc = sysconfig.get_paths().get("include")
    return Path(inc) if inc and Path(inc).is_dir() else None


def _sorted_files(root: Path, pattern: str) -> list[Path]:
    # Sort on the posix relative path so the order never depends on the
    # filesystem's directory order.
    return sorted(root.rglob(pattern), key=lambda p: p.relative_to(root).as_posix())


def _is_library_source(rel: Path) -> bool:
    parts = rel.parts
    top = parts[0]
    if top in _EXCLUDED_TOP or top.startswith(("config-", "_sysconfigdata")):
        return False
    # Package-internal test dirs (ctypes/test, tkinter/test, unittest/test, ...).
    return not any(p.startswith("test") or p in ("idle_test", "__pycache__") for p in parts[:-1])


def _initial(rel: Path) -> str:
    # "_pydecimal" belongs with "p", "__future__" with "f".
    name = rel.parts[0].lstrip("_") or rel.parts[0]
    return name[0].lower()


def _library_files(stdlib: Path) -> list[tuple[Path, str]]:
    out = []
    for path in _sorted_files(stdlib, "*.py"):
        rel = path.relative_to(stdlib)
        if path.is_file() and _is_library_source(rel):
            out.append((path, rel.as_posix()))
    return out


# --------------------------------------------------------------------------- #
# Reading and chunking
# --------------------------------------------------------------------------- #


def _read_utf8(path: Path, stats: _Stats) -> str | None:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        stats.skipped_non_utf8 += 1
        return None
    return text.removeprefix("\ufeff")


def _chunk(text: str, max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """Split at line boundaries into pieces of at most ``max_chars``."""
    if len(text) <= max_chars:
        return [text]
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        # A single monster line (data tables) is hard-split; rare but possible.
        while len(line) > max_chars:
            if current:
                chunks.append("".join(current))
                current, size = [], 0
            chunks.append(line[:max_chars])
            line = line[max_chars:]
        if size + len(line) > max_chars and current:
            chunks.append("".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line)
    if current:
        chunks.append("".join(current))
    return chunks


def _documents(pieces: Iterable[tuple[str, str]]) -> list[Document]:
    docs = []
    for text, source in pieces:
        if not text.strip():
            continue
        docs.extend(Document(chunk, source) for chunk in _chunk(text))
    return docs


# --------------------------------------------------------------------------- #
# The four domains
# --------------------------------------------------------------------------- #


def _source_pieces(
    files: list[tuple[Path, str]], keep: Callable[[str], bool], stats: _Stats
) -> Iterator[tuple[str, str]]:
    for path, rel in files:
        if not keep(rel):
            continue
        text = _read_utf8(path, stats)
        if text is not None:
            yield text, rel


def _docstrings_in_source_order(tree: ast.AST) -> Iterator[str]:
    # ast.walk is breadth-first; a depth-first walk keeps the prose in the
    # order a reader of the module would meet it.
    if isinstance(tree, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(tree, clean=True)
        if doc and doc.strip():
            yield doc.strip()
    for child in ast.iter_child_nodes(tree):
        yield from _docstrings_in_source_order(child)


def _docstring_pieces(files: list[tuple[Path, str]], stats: _Stats) -> Iterator[tuple[str, str]]:
    for path, rel in files:
        text = _read_utf8(path, stats)
        if text is None:
            continue
        try:
            tree = ast.parse(text, filename=rel)
        except (SyntaxError, ValueError):
            stats.skipped_unparsable += 1
            continue
        # ast-decoded docstrings may hold lone surrogates ("\udc80" escapes): not writable as UTF-8
        docs = [d for d in _docstrings_in_source_order(tree) if not unicode_problem(d)]
        if docs:
            yield "\n\n".join(docs), rel


def _load_pydoc_topics(stdlib: Path) -> dict[str, str]:
    path = stdlib / "pydoc_data" / "topics.py"
    if not path.is_file():
        return {}
    # topics.py is a single `topics = {...}` literal: literal_eval reads it
    # without executing anything.
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "topics" for t in node.targets
        ):
            value = ast.literal_eval(node.value)
            if isinstance(value, dict):
                return {str(k): str(v) for k, v in value.items()}
    return {}


def _topic_pieces(stdlib: Path) -> Iterator[tuple[str, str]]:
    topics = _load_pydoc_topics(stdlib)
    for name in sorted(topics):
        if not unicode_problem(topics[name]):
            yield topics[name], f"pydoc_data/topics.py#{name}"


def _test_suite_pieces(stdlib: Path, stats: _Stats) -> Iterator[tuple[str, str]]:
    test_dir = stdlib / "test"
    for path in _sorted_files(test_dir, "test_*.py") if test_dir.is_dir() else []:
        if "__pycache__" in path.parts or not path.is_file():
            continue
        text = _read_utf8(path, stats)
        if text is not None:
            yield text, path.relative_to(stdlib).as_posix()


def _header_pieces(include: Path, stats: _Stats) -> Iterator[tuple[str, str]]:
    for path in _sorted_files(include, "*.h"):
        text = _read_utf8(path, stats)
        if text is not None:
            yield text, f"include/{path.relative_to(include).as_posix()}"


@functools.lru_cache(maxsize=1)
def _collect_versions(stdlib: Path) -> dict[str, tuple[str, list[Document], _Stats]]:
    """Return ``{version: (domain description, documents, stats)}``.

    Cached per process: parsing the standard library takes seconds and every run directory
    (a test session makes dozens) builds its own copy; the documents are ~30 MB of text and
    read-only to the callers.
    """
    files = _library_files(stdlib)
    stats = {v: _Stats() for v in VERSIONS}
    out = {
        "v1": (
            "python source, stdlib modules a-l",
            _documents(_source_pieces(files, lambda r: _initial(Path(r)) <= "l", stats["v1"])),
        ),
        "v2": (
            "python source, stdlib modules m-z",
            _documents(_source_pieces(files, lambda r: _initial(Path(r)) > "l", stats["v2"])),
        ),
    }
    prose = list(_docstring_pieces(files, stats["v3"])) + list(_topic_pieces(stdlib))
    out["v3"] = ("english prose: stdlib docstrings + pydoc topics", _documents(prose))
    v4 = _documents(_test_suite_pieces(stdlib, stats["v4"]))
    domain = "python test suite (test/test_*.py)"
    include = _include_dir()
    if not v4 and include is not None:
        stats["v4"] = _Stats()
        v4 = _documents(_header_pieces(include, stats["v4"]))
        domain = "C headers of the interpreter"
    out["v4"] = (domain, v4)
    for version, (domain, docs) in out.items():
        if len(docs) < 2:
            raise RuntimeError(
                f"embedded corpus: version {version} ({domain}) has only {len(docs)} "
                f"documents on this interpreter ({sys.executable}); bring your own corpus"
            )
    return {v: (d, docs, stats[v]) for v, (d, docs) in out.items()}


# --------------------------------------------------------------------------- #
# Sampling and splitting
# --------------------------------------------------------------------------- #


def _sample(docs: list[Document], max_docs: int | None, max_chars: int, rng: random.Random) -> list[Document]:
    """Seeded subset under both caps, returned in original (walk) order."""
    order = list(range(len(docs)))
    rng.shuffle(order)
    chosen: list[int] = []
    chars = 0
    for i in order:
        if max_docs is not None and len(chosen) >= max_docs:
            break
        if chars + len(docs[i].text) > max_chars and chosen:
            break
        chosen.append(i)
        chars += len(docs[i].text)
    return [docs[i] for i in sorted(chosen)]


def _long_lines(text: str) -> Iterator[str]:
    """The lines that identify text (stripped, at least OVERLAP_MIN_CHARS): not braces or ``pass``."""
    return (line for line in map(str.strip, text.splitlines()) if len(line) >= OVERLAP_MIN_CHARS)


def _seen_share(text: str, trained: set[str]) -> float:
    lines = list(_long_lines(text))
    return sum(line in trained for line in lines) / len(lines) if lines else 0.0


def _split(docs: list[Document], val_fraction: float, rng: random.Random,
           seen: frozenset[str] = frozenset()) -> tuple[list[Document], list[Document]]:
    """Hold out ``val_fraction`` of the documents (>= 1, and train stays non-empty).

    Whole source files go to one side, so a file's chunks never straddle the
    split (that would leak near-duplicate context into validation). Source files in
    ``seen`` (text an earlier version trained on) are held out only when nothing else is left.
    """
    target = min(max(1, round(val_fraction * len(docs))), len(docs) - 1)
    counts: dict[str, int] = {}
    for d in docs:
        counts[d.source] = counts.get(d.source, 0) + 1
    sources = sorted(counts)
    rng.shuffle(sources)
    if seen and seen.issuperset(sources):
        logger.warning("every source file of this version repeats an earlier version's train text: "
                       "its held-out documents will too")
        seen = frozenset()
    val_sources: set[str] = set()
    n_val = 0
    for source in sources:
        if n_val >= target:
            break
        if n_val + counts[source] > len(docs) - 1 or source in seen:
            continue
        val_sources.add(source)
        n_val += counts[source]
    if not val_sources:  # a single source holds (nearly) everything
        pool = [i for i, d in enumerate(docs) if d.source not in seen]  # all of them when nothing is seen
        idx = set(rng.sample(pool, min(target, len(pool))))
        val = [d for i, d in enumerate(docs) if i in idx]
        train = [d for i, d in enumerate(docs) if i not in idx]
    else:
        val = [d for d in docs if d.source in val_sources]
        train = [d for d in docs if d.source not in val_sources]
    # Shuffle within a split so any prefix of a file is representative
    # (otherwise a streaming reader would see modules in alphabetical order).
    rng.shuffle(train)
    rng.shuffle(val)
    return train, val


# --------------------------------------------------------------------------- #
# Writing
# --------------------------------------------------------------------------- #


def _jsonl_bytes(docs: list[Document]) -> bytes:
    lines = (json.dumps({"text": d.text, "source": d.source}, ensure_ascii=False) for d in docs)
    return "".join(line + "\n" for line in lines).encode("utf-8")


def _parameters(max_docs_per_version: int | None, val_fraction: float, seed: int) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "held_out_max_seen": HELD_OUT_MAX_SEEN,
        "max_docs_per_version": max_docs_per_version,
        "val_fraction": val_fraction,
        "seed": seed,
        "max_doc_chars": MAX_DOC_CHARS,
        "max_chars_per_version": MAX_CHARS_PER_VERSION,
        # The text comes from the interpreter, so a different Python is a
        # different corpus.
        "python_version": sys.version.split()[0],
    }


def _is_up_to_date(out_dir: Path, params: dict) -> bool:
    manifest_path = out_dir / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    recorded = manifest.get("parameters") or {}
    if recorded != params:
        # Built before held-out documents avoided earlier versions' text: kept, since a run may
        # have trained on it (a rebuilt version would no longer match what it trained).
        if recorded != {k: v for k, v in params.items() if k != "held_out_max_seen"}:
            return False
        logger.info("%s: built before held-out splits avoided earlier versions' train text; kept as it is",
                    out_dir)
    # Every recorded file is there with its content: a run directory in a bucket copies the parts
    # by size, so a same-size stale part is caught here (reads the corpus once, at most
    # 4 x MAX_CHARS_PER_VERSION characters: a fraction of a second).
    for info in manifest.get("versions", {}).values():
        for rel, meta in info.get("files", {}).items():
            path = out_dir / rel
            if not path.is_file() or path.stat().st_size != meta.get("bytes") or \
                    hashlib.sha256(path.read_bytes()).hexdigest() != meta.get("sha256"):
                return False
    return True


def _validate_args(max_docs_per_version: int | None, val_fraction: float) -> None:
    if max_docs_per_version is not None and max_docs_per_version < 2:
        raise ValueError("max_docs_per_version must be >= 2 (one train and one val document)")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")


def build_embedded_corpus(
    out_dir: str | Path,
    *,
    max_docs_per_version: int | None = None,
    val_fraction: float = 0.05,
    seed: int = 0,
) -> Path:
    """Build the 4-version embedded corpus under ``out_dir`` and return ``out_dir``.

    A no-op when ``out_dir/corpus.json`` already records the same parameters.
    """
    _validate_args(max_docs_per_version, val_fraction)
    out = Path(out_dir)
    params = _parameters(max_docs_per_version, val_fraction, seed)
    if _is_up_to_date(out, params):
        logger.debug("embedded corpus at %s is up to date", out)
        return out
    out.mkdir(parents=True, exist_ok=True)
    # Drop a stale manifest first so a crash mid-rebuild never leaves a
    # manifest describing files that were partly replaced.
    (out / MANIFEST_NAME).unlink(missing_ok=True)

    stdlib = _stdlib_dir()
    versions: dict[str, dict] = {}
    trained: set[str] = set()  # earlier versions' train lines: grows with the corpus (~the text, once)
    for index, (version, (domain, docs, stats)) in enumerate(_collect_versions(stdlib).items()):
        # One independent stream per version: changing v1's inputs must not
        # reshuffle v4.
        rng = random.Random(f"{seed}:{index}")
        docs = _sample(docs, max_docs_per_version, MAX_CHARS_PER_VERSION, rng)
        seen = frozenset(d.source for d in docs if _seen_share(d.text, trained) > HELD_OUT_MAX_SEEN)
        train, val = _split(docs, val_fraction, rng, seen)
        trained.update(line for d in train for line in _long_lines(d.text))
        info: dict = {"domain": domain, "files": {}, "sources_kept_in_train": len(seen)}
        for split, split_docs in (("train", train), ("val", val)):
            rel = f"{version}/{split}/{PART_NAME}"
            data = _jsonl_bytes(split_docs)
            atomic_write_bytes(out / rel, data)
            info["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
            info[f"{split}_docs"] = len(split_docs)
            info[f"{split}_chars"] = sum(len(d.text) for d in split_docs)
        info["skipped_non_utf8"] = stats.skipped_non_utf8
        info["skipped_unparsable"] = stats.skipped_unparsable
        versions[version] = info
        logger.info(
            "corpus %s (%s): %d train / %d val docs, %d chars",
            version, domain, info["train_docs"], info["val_docs"],
            info["train_chars"] + info["val_chars"],
        )

    manifest = {"parameters": params, "python": sys.version, "stdlib": str(stdlib), "versions": versions}
    atomic_write_bytes(out / MANIFEST_NAME, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    return out
