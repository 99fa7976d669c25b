"""Tests for the embedded corpus (raypath.corpus)."""

from __future__ import annotations

import hashlib
import json
import re
import sysconfig
from pathlib import Path

import pytest

from raypath import corpus
from raypath.corpus import MAX_DOC_CHARS, VERSIONS, build_embedded_corpus

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def _read(root: Path, version: str, split: str) -> list[dict]:
    path = root / version / split / "part-000.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _texts(root: Path, version: str) -> list[str]:
    return [r["text"] for r in _read(root, version, "train")]


def _all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _def_class_share(texts: list[str]) -> float:
    lines = [ln.strip() for t in texts for ln in t.splitlines() if ln.strip()]
    return sum(ln.startswith(("def ", "class ")) for ln in lines) / len(lines)


def _alpha_word_share(texts: list[str]) -> float:
    words = [w for t in texts for w in t.split()]
    return sum(w.isalpha() for w in words) / len(words)


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_embedded_corpus(tmp_path_factory.mktemp("full"))


@pytest.fixture(scope="module")
def manifest(full: Path) -> dict:
    return json.loads((full / "corpus.json").read_text(encoding="utf-8"))


def test_layout_has_four_nonempty_versions(full: Path, manifest: dict) -> None:
    assert sorted(p.name for p in full.iterdir() if p.is_dir()) == list(VERSIONS)
    for v in VERSIONS:
        train, val = _read(full, v, "train"), _read(full, v, "val")
        assert len(train) > 10 and len(val) >= 1
        assert manifest["versions"][v]["train_docs"] == len(train)
        assert manifest["versions"][v]["val_docs"] == len(val)
        for rec in train + val:
            assert set(rec) == {"text", "source"}
            assert rec["text"].strip()
            assert len(rec["text"]) <= MAX_DOC_CHARS


def test_version_sizes_in_range(manifest: dict) -> None:
    for v in VERSIONS:
        info = manifest["versions"][v]
        chars = info["train_chars"] + info["val_chars"]
        assert 1_000_000 <= chars <= 6_000_000, (v, chars)


def test_manifest_hashes_match_files(full: Path, manifest: dict) -> None:
    n = 0
    for info in manifest["versions"].values():
        for rel, meta in info["files"].items():
            assert _sha(full / rel) == meta["sha256"]
            assert (full / rel).stat().st_size == meta["bytes"]
            n += 1
    assert n == 2 * len(VERSIONS)


def test_sources_are_real_stdlib_paths(full: Path) -> None:
    for v in VERSIONS:
        for rec in _read(full, v, "val"):
            src = rec["source"].split("#")[0]
            if src.startswith("include/"):
                continue
            assert (STDLIB / src).is_file(), src


def test_v1_v2_split_by_module_initial(full: Path) -> None:
    def initials(v: str) -> set[str]:
        return {
            Path(r["source"]).parts[0].lstrip("_")[0].lower()
            for split in ("train", "val")
            for r in _read(full, v, split)
        }

    assert initials("v1") <= set("abcdefghijkl")
    assert initials("v2") <= set("mnopqrstuvwxyz")
    assert not any(r["source"].startswith(("test/", "idlelib/", "lib2to3/")) for r in _read(full, "v1", "train"))


def test_real_distribution_shift_code_to_prose(full: Path) -> None:
    v2, v3 = _texts(full, "v2"), _texts(full, "v3")
    # Measured on CPython 3.11: def/class lines ~8% in v2 vs ~0.5% in v3;
    # alphabetic-word share ~0.52 vs ~0.76.
    assert _def_class_share(v2) > 5 * _def_class_share(v3)
    assert _def_class_share(v2) > 0.03
    assert _alpha_word_share(v3) - _alpha_word_share(v2) > 0.15


def test_v4_is_a_different_register(full: Path, manifest: dict) -> None:
    def assert_share(texts: list[str]) -> float:
        lines = [ln for t in texts for ln in t.splitlines() if ln.strip()]
        return sum("self.assert" in ln for ln in lines) / len(lines)

    if manifest["versions"]["v4"]["domain"].startswith("python test suite"):
        assert assert_share(_texts(full, "v4")) > 10 * max(assert_share(_texts(full, "v1")), 1e-3)
    else:  # C headers fallback
        v4 = _texts(full, "v4")
        assert sum(len(re.findall(r"^#\s*define", t, re.M)) for t in v4) > 100


def test_deterministic_across_builds(full: Path, tmp_path: Path) -> None:
    again = build_embedded_corpus(tmp_path / "again")
    files_a = {p.relative_to(full): _sha(p) for p in _all_files(full)}
    files_b = {p.relative_to(again): _sha(p) for p in _all_files(again)}
    assert files_a == files_b


def test_max_docs_caps_and_seed_changes_sample(tmp_path: Path) -> None:
    a = build_embedded_corpus(tmp_path / "a", max_docs_per_version=12, seed=0)
    b = build_embedded_corpus(tmp_path / "b", max_docs_per_version=12, seed=1)
    for v in VERSIONS:
        train, val = _read(a, v, "train"), _read(a, v, "val")
        assert len(train) + len(val) == 12
        assert len(val) >= 1 and len(train) >= 1
        # Train and val never share a source file (no chunk leakage).
        assert not {r["source"] for r in train} & {r["source"] for r in val}
    assert _sha(a / "v1/train/part-000.jsonl") != _sha(b / "v1/train/part-000.jsonl")


def test_val_fraction_respected(tmp_path: Path) -> None:
    out = build_embedded_corpus(tmp_path / "c", max_docs_per_version=100, val_fraction=0.2)
    for v in VERSIONS:
        n_val = len(_read(out, v, "val"))
        assert 15 <= n_val <= 35, (v, n_val)


def test_second_build_is_noop_and_param_change_rebuilds(tmp_path: Path) -> None:
    out = build_embedded_corpus(tmp_path / "d", max_docs_per_version=6)
    before = {p: p.stat().st_mtime_ns for p in _all_files(out)}
    build_embedded_corpus(tmp_path / "d", max_docs_per_version=6)
    assert {p: p.stat().st_mtime_ns for p in _all_files(out)} == before

    build_embedded_corpus(tmp_path / "d", max_docs_per_version=8)
    manifest = json.loads((out / "corpus.json").read_text(encoding="utf-8"))
    assert manifest["parameters"]["max_docs_per_version"] == 8
    assert sum(1 for _ in _read(out, "v3", "train")) + len(_read(out, "v3", "val")) == 8
    # No temp files left behind by the atomic writes.
    assert not [p for p in _all_files(out) if p.name.startswith(".")]


def test_damaged_file_triggers_rebuild(tmp_path: Path) -> None:
    out = build_embedded_corpus(tmp_path / "e", max_docs_per_version=4)
    target = out / "v2/val/part-000.jsonl"
    good = target.read_bytes()
    target.write_bytes(b"")
    build_embedded_corpus(tmp_path / "e", max_docs_per_version=4)
    assert target.read_bytes() == good


@pytest.mark.parametrize("kwargs", [{"max_docs_per_version": 1}, {"val_fraction": 0.0}, {"val_fraction": 1.0}])
def test_bad_arguments(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        build_embedded_corpus(tmp_path / "bad", **kwargs)


def test_chunk_splits_at_line_boundaries() -> None:
    text = "".join(f"line {i} " + "x" * (i % 97) + "\n" for i in range(3000))
    chunks = corpus._chunk(text, max_chars=5000)
    assert len(chunks) > 1
    assert "".join(chunks) == text
    assert all(len(c) <= 5000 and c.endswith("\n") for c in chunks)
    long_line = "y" * 12_345
    assert "".join(corpus._chunk(long_line, max_chars=5000)) == long_line


def test_non_utf8_files_are_skipped_and_counted(tmp_path: Path) -> None:
    bad = tmp_path / "latin.py"
    bad.write_bytes("s = 'caf\xe9'\n".encode("latin-1"))
    good = tmp_path / "ok.py"
    good.write_bytes("\ufeffs = 'café'\n".encode("utf-8"))
    stats = corpus._Stats()
    assert corpus._read_utf8(bad, stats) is None
    assert corpus._read_utf8(good, stats) == "s = 'café'\n"
    assert stats.skipped_non_utf8 == 1


def test_corpus_overlap_counts_held_out_lines_an_earlier_version_trained_on(tmp_path):
    from raypath.sources import discover_versions

    mod = _overlap_module()
    seen, new, short = "a line the first version trains on, long enough", "a line no train split holds at all", "x = 1"

    def write(version: str, split: str, *texts: str) -> None:
        (tmp_path / version / split).mkdir(parents=True, exist_ok=True)
        (tmp_path / version / split / "part-000.jsonl").write_text("".join(json.dumps({"text": t}) + "\n"
                                                                           for t in texts))

    write("v1", "train", f"{seen}\n{short}")
    write("v1", "val", new)
    write("v2", "train", new)
    write("v2", "val", f"  {seen}  \n{new}\n{short}")  # stripped; the short line is not counted
    rows = {r["version"]: r for r in mod.overlap(discover_versions(tmp_path))}
    assert rows["v2"]["lines"] == 2 and rows["v2"]["in_earlier_train"] == 0.5 and rows["v2"]["in_own_train"] == 0.5
    assert rows["v1"]["in_earlier_train"] == 0.0 and rows["v1"]["in_other_train"] == 1.0  # v2 trains on it later


def _overlap_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "corpus_overlap", Path(__file__).resolve().parents[1] / "benchmarks" / "corpus_overlap.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_held_out_text_is_new_to_the_lineage(full: Path, manifest: dict) -> None:
    """v3's docstrings are inside v1/v2's source: drawn at random, 47% of v3's val lines were in
    v1/v2 train. Held-out documents now come from source files v1/v2 did not train on."""
    from raypath.sources import discover_versions

    rows = {r["version"]: r for r in _overlap_module().overlap(discover_versions(full))}
    assert rows["v3"]["lines"] > 1000 and rows["v3"]["in_earlier_train"] < 0.02, rows["v3"]
    assert all(r["in_earlier_train"] < 0.02 for r in rows.values()), rows
    assert manifest["versions"]["v3"]["sources_kept_in_train"] > 100  # the docstrings of trained modules


def test_split_holds_out_only_unseen_sources_and_is_a_plain_draw_when_none_are_seen() -> None:
    import random

    docs = [corpus.Document(f"text {i}", f"m{i % 10}.py") for i in range(40)]
    plain = corpus._split(docs, 0.25, random.Random(3))
    assert corpus._split(docs, 0.25, random.Random(3), frozenset({"not-a-source.py"})) == plain
    seen = frozenset(f"m{i}.py" for i in range(8))
    train, val = corpus._split(docs, 0.25, random.Random(3), seen)
    assert {d.source for d in val} <= {"m8.py", "m9.py"} and val and len(train) + len(val) == 40
    everything = frozenset(f"m{i}.py" for i in range(10))  # nothing new: a plain draw, with a warning
    assert corpus._split(docs, 0.25, random.Random(3), everything) == plain


def test_a_corpus_built_before_held_out_decontamination_is_kept(tmp_path: Path) -> None:
    """A run may have trained on it: rebuilding would change versions it trained."""
    out = build_embedded_corpus(tmp_path / "old", max_docs_per_version=6)
    path = out / "corpus.json"
    manifest = json.loads(path.read_text(encoding="utf-8"))
    del manifest["parameters"]["held_out_max_seen"]
    manifest["versions"]["v3"]["marker"] = "old build"
    path.write_text(json.dumps(manifest))
    build_embedded_corpus(out, max_docs_per_version=6)
    assert json.loads(path.read_text(encoding="utf-8"))["versions"]["v3"]["marker"] == "old build"
    manifest["parameters"]["seed"] = 1  # any other difference still rebuilds
    path.write_text(json.dumps(manifest))
    build_embedded_corpus(out, max_docs_per_version=6)
    assert "marker" not in json.loads(path.read_text(encoding="utf-8"))["versions"]["v3"]
