"""Version preparation on Ray Data: the sharded layout, one stream whatever the actors,
every input format and filesystem, old run directories, bad files among many."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from conftest import AWS_ENV, ROOT, bucket

from raypath.data import (
    DataError,
    PrepareSpec,
    discover_versions,
    prepare_versions,
    read_blocks,
    read_manifest,
    version_files,
)
from raypath.dedup import Rule, minhash
from raypath.sources import Chunk, _lines, iter_docs
from raypath.storage import write_json

WORDS = ("train", "branch", "decay", "replay", "shard", "token", "version", "ray", "loss", "path")


def _docs(k: int, n: int) -> list[str]:
    rng = np.random.default_rng(k)
    return [f"doc {k}.{i}: " + " ".join(rng.choice(WORDS, size=int(rng.integers(20, 120)))) for i in range(n)]


def _write_jsonl(path: Path, docs: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))


def _corpus(root: Path, versions: int = 3, files: int = 4, docs: int = 30, parquet: bool = True) -> Path:
    """Several files per version, so a version is many chunks; the last one's first file in parquet."""
    for k in range(versions):
        texts = _docs(k, files * docs + 6)
        for f in range(files):
            part = texts[f * docs:(f + 1) * docs]
            if parquet and k == versions - 1 and f == 0:
                (root / f"v{k + 1}" / "train").mkdir(parents=True, exist_ok=True)
                pq.write_table(pa.table({"text": part}), root / f"v{k + 1}" / "train" / "part-0.parquet",
                               row_group_size=8)
            else:
                _write_jsonl(root / f"v{k + 1}" / "train" / f"part-{f}.jsonl", part)
        _write_jsonl(root / f"v{k + 1}" / "val" / "part-0.jsonl", texts[-6:])
    return root


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from raypath.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(_docs(0, 50) + _docs(1, 50), 320, out)
    return str(out)


def _spec(data_dir: Path, tokenizer_dir: str, **kw) -> PrepareSpec:
    # Small chunks and shards: byte-range chunks of jsonl files, several row groups per
    # parquet chunk and several stream shards, as a large corpus would have.
    base = dict(data_dir=str(data_dir), tokenizer_dir=tokenizer_dir, seq_len=16, text_column="text",
                val_blocks=6, replay_ratio=0.25, seed=3, actors=1, min_blocks=4,
                chunk_bytes=2048, shard_bytes=3000)
    return PrepareSpec(**{**base, **kw})


def _files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*.parquet"))}


# ---------------------------------------------------------------- reading

def test_byte_ranges_of_a_jsonl_file_yield_every_line_once(tmp_path):
    path = tmp_path / "a.jsonl"
    docs = _docs(5, 40)
    _write_jsonl(path, docs)
    size = path.stat().st_size
    for step in (1, 7, 100, 333, size):
        got = []
        for start in range(0, size, step):
            with open(path, "rb") as f:
                got += [line for _, line in _lines(f, start, min(start + step, size))]
        assert [json.loads(line)["text"] for line in got] == docs, step
    texts = [t for _, t, _, _ in iter_docs(Chunk(str(path), "jsonl", 0, size), "text")]
    assert texts == docs


def test_a_null_text_is_no_document_in_jsonl_as_in_parquet(tmp_path):
    """The same rows, {"text": null} among them, read alike from both formats; a line without the
    field (a wrong data.text_column) stays a problem."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": "a"}, {"text": None}, {"text": "b"}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*rows, {"body": "c"}]))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    jsonl = [(t, p) for _, t, p, _ in iter_docs(Chunk(str(tmp_path / "a.jsonl"), "jsonl"), "text")]
    parquet = [(t, p) for _, t, p, _ in iter_docs(Chunk(str(tmp_path / "a.parquet"), "parquet"), "text")]
    assert jsonl[:3] == parquet == [("a", None), (None, None), ("b", None)]
    assert jsonl[3] == (None, "no 'text' string field")


def test_a_line_of_many_read_blocks_is_read_whole(monkeypatch):
    """A huge document, or a JSON array saved as one line, spans 8192 read blocks of 1 KiB here
    (its reading time against short lines: benchmarks/jsonl_lines.py)."""
    import io

    monkeypatch.setattr("raypath.sources._READ", 1024)
    data = b'{"text": "' + b"x" * (8 << 20) + b'"}\n{"text": "next"}\n'
    lines = [line for _, line in _lines(io.BytesIO(data))]
    assert [len(line) for line in lines] == [(8 << 20) + 13, 17]
    tail = [line for _, line in _lines(io.BytesIO(data), 5 << 20, len(data))]  # a range inside the long line
    assert tail == [b'{"text": "next"}\n']


def test_a_datasets_arrow_directory_reads_like_jsonl(ray_cluster, tmp_path, tokenizer_dir):
    datasets = pytest.importorskip("datasets")
    jsonl = _corpus(tmp_path / "jsonl", versions=1, files=1, parquet=False)
    arrow = tmp_path / "arrow"
    shutil.copytree(jsonl / "v1" / "val", arrow / "v1" / "val")
    docs = [json.loads(line)["text"] for line in (jsonl / "v1" / "train" / "part-0.jsonl").read_text().splitlines()]
    datasets.Dataset.from_dict({"text": docs, "id": list(range(len(docs)))}).save_to_disk(str(arrow / "v1" / "train"))
    src = discover_versions(arrow)[0]
    assert [Path(f).suffix for f in src.train_files] == [".arrow"]

    a = prepare_versions(discover_versions(jsonl), _spec(tmp_path / "a", tokenizer_dir, chunk_bytes=1 << 30))
    b = prepare_versions([src], _spec(tmp_path / "b", tokenizer_dir))
    assert a[0]["docs"] == b[0]["docs"] == len(docs)
    assert _files(Path(a[0]["stream_path"])) and _files(Path(a[0]["stream_path"])) == _files(Path(b[0]["stream_path"]))


# ---------------------------------------------------------------- the stream

def test_stream_is_byte_identical_whatever_the_number_of_actors(ray_cluster, tmp_path, tokenizer_dir):
    corpus = _corpus(tmp_path / "corpus")
    one = prepare_versions(discover_versions(corpus), _spec(tmp_path / "one", tokenizer_dir, actors=1))
    two = prepare_versions(discover_versions(corpus), _spec(tmp_path / "two", tokenizer_dir, actors=2))
    for a, b in zip(one, two):
        for kind in ("new", "stream", "val"):
            fa, fb = _files(Path(a[f"{kind}_path"])), _files(Path(b[f"{kind}_path"]))
            assert fa and fa == fb, (a["name"], kind)

    v1, v3 = one[0], one[2]
    assert len(v3["new_chunk_rows"]) > 4 and v3["stream_shards"] > 1  # really sharded
    assert v3["dropped_share"] < 0.05 and v3["dropped_tokens"] < 17 * len(v3["new_chunk_rows"])
    for rec in one:
        stream = pq.read_table(rec["stream_path"], columns=["idx", "src"])
        idx, src = np.sort(stream["idx"].to_numpy()), stream["src"].to_numpy()
        assert idx.tolist() == list(range(rec["stream_rows"]))  # positions are exactly 0..n-1
        assert (src == rec["index"]).sum() == rec["new_blocks"]  # every new block once
        assert (src != rec["index"]).sum() == rec["replay_blocks"]
    assert v1["replay_blocks"] == 0
    assert v3["replay_blocks"] == round(0.25 / 0.75 * v3["new_blocks"])  # exact, without replacement
    # The stream holds the new blocks themselves, shuffled: same multiset of rows.
    new = read_blocks(v3["new_path"])
    stream = pq.read_table(v3["stream_path"]).sort_by("idx")
    own = read_blocks(v3["stream_path"])[stream["src"].to_numpy() == 2]
    assert sorted(map(bytes, own)) == sorted(map(bytes, new))
    assert not np.array_equal(own, new)
    # Another seed, another order (of the first version: the rule is the same for each).
    other = prepare_versions(discover_versions(corpus)[:1], _spec(tmp_path / "seed", tokenizer_dir, seed=4))
    assert _files(Path(other[0]["stream_path"])) != _files(Path(v1["stream_path"]))
    assert _files(Path(other[0]["new_path"])) == _files(Path(v1["new_path"]))  # the same blocks


def _dup_corpus(root: Path) -> Path:
    """v1 repeats 3 of its documents in its second file; v2 repeats 5 of v1's train documents,
    2 of v1's val ones, 1 of its own val ones and, in a parquet file, 4 of its own; v2's val
    split holds one of v1's train documents."""
    v1, v1_val, v2, v2_val = _docs(0, 60), _docs(10, 6), _docs(1, 60), _docs(11, 6)
    _write_jsonl(root / "v1" / "train" / "part-0.jsonl", v1[:30])
    _write_jsonl(root / "v1" / "train" / "part-1.jsonl", v1[30:] + v1[:3])
    _write_jsonl(root / "v1" / "val" / "part-0.jsonl", v1_val)
    _write_jsonl(root / "v2" / "train" / "part-0.jsonl", v2[:30] + v1[10:15] + v1_val[:2] + v2_val[:1] + v2[30:])
    pq.write_table(pa.table({"text": v2[40:44]}), root / "v2" / "train" / "part-1.parquet", row_group_size=2)
    _write_jsonl(root / "v2" / "val" / "part-0.jsonl", v2_val + v1[20:21])
    return root


def _text(rec: dict, tokenizer_dir: str) -> str:
    """A version's packed train text in file order (a chunk group's tail is lost at its pack edge)."""
    from raypath.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir).decode(read_blocks(rec["new_path"]).ravel().tolist())


def test_exact_dedup_drops_what_an_earlier_version_trained_a_held_out_split_holds_or_the_version_repeats(
        ray_cluster, tmp_path, tokenizer_dir, monkeypatch, caplog):
    from raypath import dedup
    from raypath.data import check_prepared

    corpus = _dup_corpus(tmp_path / "corpus")
    v1, v2 = prepare_versions(discover_versions(corpus), _spec(tmp_path / "run", tokenizer_dir, dedup=Rule("exact")))
    assert v1["dedup"] == {"docs": 63, "dropped": 3, "earlier": 0, "held_out": 0, "within": 3, "index_rows": 66,
                           "held_out_docs": 6, "held_out_trained": 0}
    assert v2["dedup"] == {"docs": 72, "dropped": 12, "earlier": 5, "held_out": 3, "within": 4, "index_rows": 66,
                           "held_out_docs": 7, "held_out_trained": 1}
    assert "v2: 1 of its 7 val/test documents were trained by an earlier version" in caplog.text
    assert (v1["docs"], v2["docs"]) == (60, 60) and v2["skipped_docs"] == {}
    text = _text(v2, tokenizer_dir)
    for k, i in [(0, i) for i in range(10, 15)] + [(10, 0), (10, 1), (11, 0)]:
        assert f"doc {k}.{i}:" not in text
    assert all(text.count(f"doc 1.{i}:") <= 1 for i in range(40, 44)) and text.count("doc 1.0:") == 1

    # Any number of decide ranges, the same documents dropped and the same blocks written.
    monkeypatch.setattr(dedup, "RANGE_ROWS", 9)
    again = prepare_versions(discover_versions(corpus), _spec(tmp_path / "ranges", tokenizer_dir, dedup=Rule("exact")))
    assert [r["dedup"] for r in again] == [v1["dedup"], v2["dedup"]]
    assert len(list((tmp_path / "ranges" / "v2" / "dedup" / "index").iterdir())) > 4
    assert len(list((tmp_path / "ranges" / "v2" / "dedup" / "drop").iterdir())) == 2  # 12 drops: 2 key ranges
    for a, b in zip((v1, v2), again):
        assert _files(Path(a["new_path"])) == _files(Path(b["new_path"]))

    # The rule is fixed once versions are prepared.
    with pytest.raises(DataError, match=r"data.dedup='exact', the config asks 'none'"):
        check_prepared(discover_versions(corpus), tmp_path / "run", 16, "none")


def test_a_version_after_a_snapshot_of_the_index_drops_what_it_would_after_every_version(
        ray_cluster, tmp_path, tokenizer_dir, monkeypatch, caplog):
    """v2 writes a snapshot of the whole index (every version after one that is not one, here);
    v3 reads it instead of v1's and v2's own parts: the same documents dropped, the same blocks."""
    from raypath import dedup

    corpus = _dup_corpus(tmp_path / "corpus")
    v1, v2 = _docs(0, 60), _docs(1, 60)
    # v3: 15 documents v1 or v2 trained, one v1 held out; in its val split one v1 trained
    _write_jsonl(corpus / "v3" / "train" / "part-0.jsonl", v1[40:50] + _docs(2, 40) + v2[:5] + _docs(10, 6)[3:4])
    _write_jsonl(corpus / "v3" / "val" / "part-0.jsonl", _docs(12, 6) + v1[55:56])
    every = prepare_versions(discover_versions(corpus), _spec(tmp_path / "every", tokenizer_dir, dedup=Rule("exact")))
    monkeypatch.setattr(dedup, "SNAPSHOT_EVERY", 1)
    caplog.set_level(logging.INFO, logger="raypath.dedup")
    snap = prepare_versions(discover_versions(corpus), _spec(tmp_path / "snap", tokenizer_dir, dedup=Rule("exact")))
    assert [r["dedup"].pop("snapshot", False) for r in snap] == [False, True, False]
    said = [r.getMessage() for r in caplog.records if "wrote a snapshot of the whole index" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("deduplicated v2 in ") and "(132 rows)" in said[0]
    assert [r["dedup"] for r in snap] == [r["dedup"] for r in every]
    assert {k: every[2]["dedup"][k] for k in ("earlier", "held_out", "within", "held_out_trained")} == \
        {"earlier": 15, "held_out": 1, "within": 0, "held_out_trained": 1}
    whole = pq.read_table(tmp_path / "snap" / "v2" / "dedup" / "snapshot")  # v1's and v2's index rows, once each
    own = [pq.read_table(tmp_path / "snap" / v / "dedup" / "index") for v in ("v1", "v2")]
    assert sorted(zip(whole["h1"].to_pylist(), whole["held_out"].to_pylist())) == \
        sorted(p for t in own for p in zip(t["h1"].to_pylist(), t["held_out"].to_pylist()))
    assert not (tmp_path / "snap" / "v3" / "dedup" / "snapshot").exists()
    for a, b in zip(every, snap):
        assert _files(Path(a["new_path"])) == _files(Path(b["new_path"]))


def test_a_decide_pass_reads_the_latest_snapshot_and_the_versions_after_it(tmp_path, monkeypatch):
    import pyarrow.fs as pafs

    from raypath import dedup

    fs = pafs.LocalFileSystem()
    monkeypatch.setattr(dedup, "SNAPSHOT_EVERY", 2)
    versions = []
    for k, snapshot in enumerate([False, False, True, False, True, False], start=1):
        d = tmp_path / f"v{k}" / "dedup"
        for kind in ("index", *(["snapshot"] if snapshot else [])):
            (d / kind).mkdir(parents=True)
            (d / kind / f"part-00000-{k:05d}.parquet").write_bytes(b"")
        versions.append((str(tmp_path / f"v{k}"), {"snapshot": True} if snapshot else {}))
    name = lambda files: [f"{Path(f).parts[-4]}/{Path(f).parent.name}" for f in files]  # noqa: E731
    files, snapshot = dedup.earlier_index(fs, versions[:2])  # two versions of their own: the next one snapshots
    assert files == [str(tmp_path / f"v{k}" / "dedup" / "index" / f"part-00000-0000{k}.parquet") for k in (1, 2)]
    assert snapshot
    files, snapshot = dedup.earlier_index(fs, versions[:4])
    assert name(files) == ["v3/snapshot", "v4/index"] and not snapshot
    files, snapshot = dedup.earlier_index(fs, versions)
    assert name(files) == ["v5/snapshot", "v6/index"] and not snapshot
    dedup.remove_old_snapshots(fs, versions)  # v5's supersedes v3's
    assert not (tmp_path / "v3" / "dedup" / "snapshot").exists() and (tmp_path / "v5" / "dedup" / "snapshot").is_dir()
    assert (tmp_path / "v3" / "dedup" / "index").is_dir()
    assert name(dedup.earlier_index(fs, versions[:4])[0]) == ["v1/index", "v2/index", "v3/index", "v4/index"]


def test_minhash_dedup_also_drops_near_duplicates(ray_cluster, tmp_path, tokenizer_dir, monkeypatch):
    """The exact duplicates of _dup_corpus, and in v2 one word added to one of v1's train
    documents, to one of its own and to one of its val documents."""
    corpus = _dup_corpus(tmp_path / "corpus")
    v1, v2, v2_val = _docs(0, 60), _docs(1, 60), _docs(11, 6)
    _write_jsonl(corpus / "v2" / "train" / "part-2.jsonl", [v1[40] + " extra", v2[5] + " extra", v2_val[3] + " extra"])
    rule = Rule("minhash")
    a, b = prepare_versions(discover_versions(corpus), _spec(tmp_path / "run", tokenizer_dir, dedup=rule))
    assert a["dedup"] == {"docs": 63, "dropped": 3, "earlier": 0, "held_out": 0, "within": 3, "index_rows": 66 * 14,
                          "held_out_docs": 6, "held_out_trained": 0, "near_kept": 0}
    # Each cause counted once per document, whatever the ranges its bands were decided in.
    assert {k: v for k, v in b["dedup"].items() if k != "index_rows"} == {
        "docs": 75, "dropped": 12 + 3, "earlier": 5 + 1, "held_out": 3 + 1, "within": 4 + 1, "held_out_docs": 7,
        "held_out_trained": 1, "near_kept": 0}
    assert b["docs"] == 60
    from raypath import dedup  # a document's bands decided in many ranges: the same record and blocks
    monkeypatch.setattr(dedup, "RANGE_ROWS", 200)
    again = prepare_versions(discover_versions(corpus), _spec(tmp_path / "ranges", tokenizer_dir, dedup=rule))
    assert [r["dedup"] for r in again] == [a["dedup"], b["dedup"]]
    assert len(list((tmp_path / "ranges" / "v2" / "dedup" / "index").iterdir())) > 4
    assert not (tmp_path / "ranges" / "v2" / "dedup" / "ranges").exists()  # collected, then removed
    assert _files(Path(b["new_path"])) == _files(Path(again[1]["new_path"]))
    text = _text(b, tokenizer_dir)
    assert "doc 0.40:" not in text and "doc 11.3:" not in text and text.count("doc 1.5:") <= 1
    assert read_manifest(tmp_path / "run" / "manifest.json")["dedup"] == str(rule) == \
        "minhash(bands=14, rows=8, shingle=5, threshold=0.7)"
    assert str(Rule("minhash", threshold=0)) == "minhash(bands=14, rows=8, shingle=5)"  # as lineages before it
    from raypath.data import check_prepared

    with pytest.raises(DataError, match=r"the config asks 'minhash\(bands=14, rows=8, shingle=5\)'; set it back "
                                        r"\(data.dedup and its data.minhash_\* settings"):
        check_prepared(discover_versions(corpus), tmp_path / "run", 16, str(Rule("minhash", threshold=0)))


def test_a_document_dropped_for_several_causes_in_several_ranges_counts_once_under_the_lowest(tmp_path, monkeypatch):
    """Doc 7's bands: one an earlier version trained (range 0), one a held-out document holds
    (range 1), one doc 3's (range 0). Doc 9 shares a band with doc 3 only; doc 11 one with an
    earlier version's held-out document; held-out doc -5 one an earlier version trained. v1's
    index has the name of older parts (``part-RRRRR``): every range reads it."""
    import pyarrow.fs as pafs

    from raypath import bucketed, dedup
    from raypath.data import write_table

    fs = pafs.LocalFileSystem()
    h = {name: (np.uint64(b) << np.uint64(48)) | np.uint64(i) for i, (name, b) in
         enumerate([("E", 10), ("W", 20), ("E2", 30), ("E3", 40), ("H", 40000)])}
    index = str(tmp_path / "v1" / "dedup" / "index" / "part-00007.parquet")
    write_table(pa.table({"bucket": pa.array([10, 30, 40], pa.uint16()), "h1": [h["E"], h["E2"], h["E3"]],
                          "h2": np.zeros(3, np.uint64), "held_out": [False, True, False]}), fs, index)
    rows = [("E", 7), ("H", 7), ("W", 7), ("W", 3), ("W", 9), ("E2", 11), ("H", dedup.held_out_key(0, 4)),
            ("E3", dedup.held_out_key(0, 4))]
    digests = b"".join(int(h[n]).to_bytes(8, "little") + bytes(8) for n, _ in rows)
    hashes = str(tmp_path / "v2" / "hashes.buckets")
    dedup.write_hashes(digests, [k for _, k in rows], fs, hashes)
    out, starts = str(tmp_path / "v2" / "dedup"), [0, 9, 100]  # the range files' buckets: keys 0-8, 9-99, 100-
    task = pa.Table.from_pylist([{"first": 0, "last": 1}])  # both ranges in one task
    counts = dedup.decide_ranges(task, [0, 32768, 65536], [hashes], [index], starts, out, fs).to_pylist()
    assert [(c["range"], c["earlier"], c["held_out"], c["within"], c["held_out_trained"]) for c in counts] == \
        [(0, 1, 1, 1, [dedup.held_out_key(0, 4)]), (1, 0, 1, 0, [])]
    # The task's ranges' drops in one file, up to RANGE_ROWS keys; range 1's doc 7 "held_out" too.
    assert {Path(c["file"]).name for c in counts} == {"part-00000.buckets"}
    both = bucketed.BucketedFiles(fs, [counts[0]["file"]], 0, 2, len(starts))
    assert both.rows(0, 2, dedup.DROP_ROW).tolist() == [(7, 1), (7, 0), (9, 2), (11, 0)]
    monkeypatch.setattr(dedup, "RANGE_ROWS", 3)  # range 0's three drops fill a file: range 1 starts one
    shutil.rmtree(out)
    counts = dedup.decide_ranges(task, [0, 32768, 65536], [hashes], [index], starts, out, fs).to_pylist()
    ranges = sorted(str(p) for p in (tmp_path / "v2" / "dedup" / "ranges").iterdir())
    assert [Path(r).name for r in ranges] == ["part-00000.buckets", "part-00001.buckets"]
    assert [c["file"] for c in counts] == ranges
    monkeypatch.undo()
    first = bucketed.BucketedFiles(fs, ranges[:1], 0, 2, len(starts))
    # range 0: doc 7 "earlier", 9 "within", 11 "held_out"; a run of buckets reads its keys only
    assert first.rows(0, 2, dedup.DROP_ROW).tolist() == [(7, 1), (9, 2), (11, 0)]
    assert first.rows(1, 1, dedup.DROP_ROW).tolist() == [(9, 2), (11, 0)]
    # Collected by key range, each key once under its lowest cause; a tokenize task reads the
    # parts of its own key range only (named by it).
    runs = [{"first": b, "last": b} for b in range(3)]
    got = [dedup.collect_drops(pa.Table.from_pylist([run]), ranges, starts, out, fs).to_pylist()[0] for run in runs]
    assert [{c: g[c] for c in dedup.CAUSES} for g in got] == [{"held_out": 1, "earlier": 0, "within": 0},
                                                              {"held_out": 1, "earlier": 0, "within": 1},
                                                              {"held_out": 0, "earlier": 0, "within": 0}]
    drops = [g["file"] for g in got if g["file"]]
    assert [Path(f).name for f in drops] == ["part-0000000000000000-0000000000000009.parquet",
                                            "part-0000000000000009-0000000000000064.parquet"] and not got[2]["file"]
    assert dedup.dropped_keys(fs, drops, 0, 100) == {7: "held_out", 9: "within", 11: "held_out"}
    Path(drops[0]).unlink()  # a reader of keys 9-99 never opens the part of keys 0-8
    assert dedup.dropped_keys(fs, drops, 9, 100) == {9: "within", 11: "held_out"}

    # A decide task opens the earlier index parts of its own buckets only (named by them).
    parts = dedup.index_files(fs, str(tmp_path / "v2"))
    assert [Path(p).name for p in parts] == ["part-00000-32768.parquet", "part-32768-65536.parquet"]
    absent = str(tmp_path / "v2" / "dedup" / "index" / "part-40000-50000.parquet")
    item = pa.Table.from_pylist([{"first": 0, "last": 0}])
    assert dedup.decide_ranges(item, [0, 32768], [hashes], [index, *parts, absent], starts, str(tmp_path / "v3"),
                               fs).to_pylist()[0]["earlier"] == 3  # docs 3, 7 and 9: v2 kept doc 3's W and doc 7's E
    with pytest.raises(FileNotFoundError):
        dedup.decide_ranges(item, [0, 40001], [hashes], [absent], starts, str(tmp_path / "v3"), fs)


def test_a_decide_task_reads_its_ranges_bytes_of_each_hash_file_and_one_index_slice(tmp_path, monkeypatch):
    """A run of ranges: per hash file one read of the run's index entries, then one ranged read of
    exactly a window of ranges' rows (no footer, no row group around them); a range a window when
    the read-ahead budget holds one; every row decided once."""
    import importlib.util

    import pyarrow.fs as pafs

    from raypath import dedup

    spec = importlib.util.spec_from_file_location("dedup_index", ROOT / "benchmarks" / "dedup_index.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    counter = bench.CountingHandler()
    fs, rng = pafs.PyFileSystem(counter), np.random.default_rng(0)
    h = rng.integers(0, np.iinfo(np.uint64).max, (60_000, 2), dtype=np.uint64, endpoint=True)
    h[50_000:] = h[:10_000]  # copies of the first 10,000 documents: dropped ("within")
    bucket = (h[:, 0] >> np.uint64(dedup.BUCKET_SHIFT)).astype(np.int64)
    hashes = [str(tmp_path / f"part-{g}.buckets") for g in range(3)]
    for g, path in enumerate(hashes):
        dedup.write_hashes(h[g::3].astype("<u8").tobytes(), list(range(g, 60_000, 3)), fs, path)
    edges = [round(i * dedup.BUCKETS / 20) for i in range(21)]
    for budget in (dedup.DECIDE_READ_BYTES, 0):
        monkeypatch.setattr(dedup, "DECIDE_READ_BYTES", budget)
        read, dropped = counter.read, 0
        for run in ({"first": 0, "last": 5}, {"first": 6, "last": 19}):
            before = (counter.read, counter.opened)
            rows = dedup.decide_ranges(pa.Table.from_pylist([run]), edges, hashes, [], [0], str(tmp_path / str(budget)),
                                       fs).to_pylist()
            assert [r["range"] for r in rows] == list(range(run["first"], run["last"] + 1))
            dropped += sum(r["within"] for r in rows)
            lo, hi = edges[run["first"]], edges[run["last"] + 1]
            in_run = int(((bucket >= lo) & (bucket < hi)).sum())
            assert counter.read - before[0] == 3 * 8 * (hi - lo + 1) + in_run * dedup.HASH_ROW.itemsize
            windows = 1 if budget else len(rows)  # a run's 720 KB in one window; a range a window
            assert counter.opened - before[1] == 3 * (1 + windows)  # local disk: reopened per read
        assert dropped == 10_000 and counter.read - read == 60_000 * dedup.HASH_ROW.itemsize + 3 * 8 * 65_538


def test_a_decide_task_reads_the_earlier_index_once_a_window_and_holds_it_within_the_budget(tmp_path, monkeypatch):
    """The earlier parts overlapping a window of ranges are read once for the window; the
    window's share of the earlier index counts against the read-ahead budget beside its hash
    rows, so a large index cuts the run into a window per range."""
    import importlib.util

    import pyarrow.fs as pafs

    from raypath import dedup
    from raypath.data import write_table

    spec = importlib.util.spec_from_file_location("dedup_index", ROOT / "benchmarks" / "dedup_index.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    counter = bench.CountingHandler()
    fs, rng = pafs.PyFileSystem(counter), np.random.default_rng(1)
    old = np.unique(rng.integers(0, np.iinfo(np.uint64).max, 20_000, dtype=np.uint64, endpoint=True))
    parts = []
    for lo, hi in ((0, 32768), (32768, 65536)):  # an earlier version's two ranges
        mine = old[((old >> np.uint64(48)) >= lo) & ((old >> np.uint64(48)) < hi)]
        parts.append(str(tmp_path / "v1" / "dedup" / "index" / f"part-{lo:05d}-{hi:05d}.parquet"))
        write_table(pa.table({"bucket": (mine >> np.uint64(48)).astype(np.uint16), "h1": mine,
                              "h2": np.zeros(len(mine), np.uint64), "held_out": np.zeros(len(mine), bool)}), fs,
                    parts[-1])
    new = rng.integers(0, np.iinfo(np.uint64).max, (10_000, 2), dtype=np.uint64, endpoint=True)
    new[:5000] = np.stack([old[:5000], np.zeros(5000, np.uint64)], axis=1)  # copies of earlier documents
    hashes = [str(tmp_path / "v2" / "part-0.buckets")]
    dedup.write_hashes(new.astype("<u8").tobytes(), list(range(10_000)), fs, hashes[0])
    before = counter.opened
    pads.dataset(parts[:1], format="parquet", filesystem=fs).to_table()
    per_read = counter.opened - before  # what one dataset read of a part opens
    edges, task = [round(i * dedup.BUCKETS / 20) for i in range(21)], pa.Table.from_pylist([{"first": 0, "last": 9}])
    got = {}
    for earlier_rows in (len(old), 10**9):  # 10**9 rows: ~850 MB of index a range, over the budget
        before = counter.opened
        rows = dedup.decide_ranges(task, edges, hashes, parts, [0], str(tmp_path / str(earlier_rows)), fs,
                                   earlier_rows=earlier_rows).to_pylist()
        got[earlier_rows] = (sum(r["earlier"] for r in rows), counter.opened - before)
    windows = {len(old): 1, 10**9: 10}  # ranges 0-9: buckets 0-32767, the first part's only
    assert got == {n: (int((old[:5000] >> np.uint64(48) < 32768).sum()), 1 + windows[n] + windows[n] * per_read)
                   for n in windows}


def test_collect_runs_split_the_key_space_without_overlap_where_a_parquet_file_spans_groups(monkeypatch):
    """Runs of chunk groups, about RANGE_ROWS dropped keys each, cut where a run's first group
    starts; a parquet file's chunks all range over its whole file: its keys go to one run."""
    from raypath import dedup

    def chunk(f, fmt, start, stop):
        return {"path": f"f{f}", "fmt": fmt, "start": start, "stop": stop, "bytes": 10, "file": f}

    train = [chunk(0, "jsonl", 0, 100), chunk(0, "jsonl", 100, -1), chunk(1, "parquet", 0, 1),
             chunk(1, "parquet", 1, 2), chunk(1, "parquet", 2, 3), chunk(2, "jsonl", 0, -1)]
    starts = dedup.group_starts(train, 10)
    assert starts == [0, 100, 1 << 40, 2 << 40]  # the parquet file's three groups: one bucket
    monkeypatch.setattr(dedup, "RANGE_ROWS", 10)
    assert dedup.collect_runs(starts, rows=5) == [{"first": 0, "last": 3}]
    assert dedup.collect_runs(starts, rows=20) == [{"first": 0, "last": 1}, {"first": 2, "last": 3}]
    runs = dedup.collect_runs(starts, rows=60)  # 6 runs asked for: one a bucket
    assert runs == [{"first": b, "last": b} for b in range(4)]
    bounds = [*starts, dedup._NO_KEY]
    for c in train:  # each chunk's documents within one run: tokenizing it reads one drop part
        lo, hi = dedup.key_range([c])
        assert sum(bounds[r["first"]] <= lo and hi <= bounds[r["last"] + 1] for r in runs) == 1, c


def test_hash_groups_are_few_and_large_while_every_cpu_keeps_two(monkeypatch):
    from raypath import dedup

    chunks = [{"path": f"f{i}", "bytes": 100} for i in range(64)]
    monkeypatch.setattr(dedup, "HASH_GROUP_BYTES", 1600)
    assert [len(g) for g in dedup.hash_groups(chunks, 100, cpus=2)] == [16] * 4  # the cap: 16 chunks
    assert [len(g) for g in dedup.hash_groups(chunks, 100, cpus=8)] == [4] * 16  # two tasks a CPU
    assert [len(g) for g in dedup.hash_groups(chunks, 100, cpus=64)] == [1] * 64  # never below a chunk group
    assert sum(dedup.hash_groups(chunks, 100, cpus=3), []) == chunks  # in order, each chunk once


def test_a_band_shared_by_chance_drops_a_document_only_when_the_rest_of_the_signatures_agree(tmp_path):
    """64 bands of one value: documents sharing a quarter of their shingles share a band almost
    surely. A threshold keeps such a document (an earlier version trained the other, or held it
    out), 0 drops it; a near-copy is dropped either way, by the sketches an earlier version's
    snapshot of the index carries."""
    import pyarrow.fs as pafs

    from raypath import bucketed, dedup
    from raypath.mirror import LOCAL

    fs, w = pafs.LocalFileSystem(), [f"w{i}" for i in range(4000)]
    a, held = " ".join(w[:400]), " ".join(w[3000:3400])
    v2 = [" ".join(w[:160] + w[1000:1240]),  # 156 of the 636 shingles of both: Jaccard 0.25 to a
          a + " extra",  # a near-copy of a
          " ".join(w[3000:3160] + w[2000:2240]),  # Jaccard 0.25 to v1's held-out document
          " ".join(w[400:800])]  # new
    offsets = np.cumsum([0] + [len(json.dumps({"text": d})) + 1 for d in v2]).tolist()
    task = pa.Table.from_pylist([{"first": 0, "last": 0}])

    def hashes(rule: Rule, v: str, train: list[str], val: list[str]) -> list[str]:
        out = []
        for k, (docs, extra) in enumerate([(train, {"file": 0}), (val, {"file": -1, "held_out": 0})]):
            _write_jsonl(path := tmp_path / str(rule.threshold) / v / f"{k}.jsonl", docs)
            out.append(str(path.with_suffix(".buckets")))
            item = {"parts": [{"path": str(path), "fmt": "jsonl", "start": 0, "stop": -1, **extra}], "out": out[-1]}
            dedup.hash_group(pa.Table.from_pylist([item]), dedup.DedupSpec("text", None, 0, LOCAL, rule), fs)
        return out

    def dropped(threshold: float) -> dict[int, str]:
        rule, root = Rule("minhash", bands=64, rows=1, threshold=threshold), tmp_path / str(threshold)
        assert rule.row.itemsize == 24 + (16 if threshold else 0)  # 2 bits a value, in every hash row
        dedup.decide_ranges(task, [0, 65536], hashes(rule, "v1", [a], [held]), [], [0], f"{root}/v1/dedup", fs,
                            snapshot=True, rule=rule)
        snapshot = dedup.index_files(fs, str(root / "v1"), "snapshot")
        assert pq.read_schema(snapshot[0]).names[-1] == ("sketch" if threshold else "held_out")
        got = dedup.decide_ranges(task, [0, 65536], hashes(rule, "v2", v2, []), snapshot, [0], f"{root}/v2/dedup",
                                  fs, rule=rule).to_pylist()[0]
        rows = bucketed.BucketedFiles(fs, [got["file"]], 0, 0, 1).rows(0, 0, dedup.DROP_ROW)
        collected = dedup.collect_drops(pa.Table.from_pylist([{"first": 0, "last": 0}]), [got["file"]], [0],
                                        f"{root}/v2/dedup", fs).to_pylist()[0]
        # what tokenizing skips: the drops, not the candidates the check kept (counted)
        assert dedup.dropped_keys(fs, [collected["file"]], 0, 1 << 62) == \
            {int(k): dedup.CAUSES[c] for k, c in rows if c != dedup.KEPT}
        assert collected["near_kept"] == sum(c == dedup.KEPT for _, c in rows)
        return {int(k): (*dedup.CAUSES, "kept")[c] for k, c in rows}

    assert dropped(0) == {offsets[0]: "earlier", offsets[1]: "earlier", offsets[2]: "held_out"}
    assert dropped(0.7) == {offsets[0]: "kept", offsets[1]: "earlier", offsets[2]: "kept"}


def test_sketches_estimate_the_similarity_of_documents_that_share_a_band():
    from raypath.dedup import similarity

    rule, w = Rule("minhash"), [f"w{i}" for i in range(2000)]
    base = " ".join(w[:400])
    for shared in (400, 380, 300, 200):  # Jaccard 1, 0.90, 0.60, 0.33
        other = " ".join(w[:shared] + w[1000:1400 - shared])
        sa, sb = ({tuple(t.split()[i:i + 5]) for i in range(396)} for t in (base, other))
        got = similarity(*(np.frombuffer(rule.hashes(t)[1], np.uint8)[None] for t in (base, other)), 112, 8)
        assert abs(got[0] - len(sa & sb) / len(sa | sb)) < 0.1, shared
    assert rule.sketch_bytes == 28 and Rule("minhash", bands=3, rows=3).sketch_bytes == 3  # 9 values, padded
    assert Rule("minhash", threshold=0).sketch_bytes == Rule("exact").sketch_bytes == 0


def test_minhash_values_agree_in_proportion_to_the_shingles_shared():
    words = [f"w{i}" for i in range(400)]
    base = " ".join(words[:200])
    for shared in (200, 150, 100, 50):  # the first `shared` words, then other ones
        other = " ".join(words[:shared] + words[200:400 - shared])
        sa, sb = {tuple(base.split()[i:i + 5]) for i in range(196)}, {tuple(other.split()[i:i + 5]) for i in range(196)}
        jaccard = len(sa & sb) / len(sa | sb)
        agree = (minhash(base, 256, 5) == minhash(other.upper(), 256, 5)).mean()  # case is ignored
        assert abs(agree - jaccard) < 0.1, (shared, agree, jaccard)
    assert minhash("", 8, 5).shape == (8,) and (minhash("a b", 8, 5) == minhash("A  B", 8, 5)).all()


def test_one_bad_file_among_many_is_named_or_skipped(ray_cluster, tmp_path, tokenizer_dir):
    corpus = _corpus(tmp_path / "corpus", versions=2, files=6)
    bad = corpus / "v2" / "train" / "part-3.jsonl"
    lines = bad.read_text().splitlines()
    bad.write_text("\n".join(lines[:2] + ['{"text": "unterminated'] + lines[2:]) + "\n")
    with pytest.raises(DataError, match=r"v2/train/part-3.jsonl: line 3: not valid JSON"):
        prepare_versions(discover_versions(corpus), _spec(tmp_path / "e", tokenizer_dir))
    assert not (tmp_path / "e" / "data" / "manifest.json").exists()  # validated before any version is written

    # skip drops the bad line alone, not its file's 30 good documents
    recs = prepare_versions(discover_versions(corpus), _spec(tmp_path / "s", tokenizer_dir, on_bad_input="skip"))
    assert recs[1]["skipped_files"] == [] and recs[1]["skipped_docs"] == {"invalid": 1}
    assert recs[1]["docs"] == 6 * 30 and len(recs[1]["train_files"]) == 6


def test_many_files_shorter_than_a_block_are_packed_together_not_dropped(ray_cluster, tmp_path, tokenizer_dir):
    """One short document per file: each file alone holds less than a block of 17 tokens."""
    corpus = tmp_path / "corpus"
    texts = _docs(5, 130)
    for split, docs in (("train", texts[:120]), ("val", texts[120:])):
        for i, doc in enumerate(docs):
            _write_jsonl(corpus / "v1" / split / f"doc-{i:03d}.jsonl", [" ".join(doc.split()[:6])])
    (rec,) = prepare_versions(discover_versions(corpus), _spec(tmp_path / "run", tokenizer_dir, replay_ratio=0.0))
    assert rec["docs"] == 120
    assert rec["dropped_share"] < 0.1 and rec["new_blocks"] >= 30  # was 0 blocks: every file dropped whole
    assert rec["val_blocks"] > 0
    assert len(rec["new_chunk_rows"]) < 120  # files share a tokenized part


def test_each_versions_file_list_is_written_once_and_the_manifest_keeps_counts(ray_cluster, tmp_path, tokenizer_dir):
    corpus = _corpus(tmp_path / "corpus")
    spec = _spec(tmp_path / "run", tokenizer_dir)
    two = prepare_versions(discover_versions(corpus)[:2], spec)
    manifest_path = tmp_path / "run" / "manifest.json"
    v1_list = tmp_path / "run" / "v1" / "files.json"
    written = (v1_list.read_bytes(), v1_list.stat().st_mtime_ns)
    three = prepare_versions(discover_versions(corpus), spec)
    # The manifest, rewritten as each version lands, holds counts; each list is written once.
    assert (v1_list.read_bytes(), v1_list.stat().st_mtime_ns) == written
    raw = json.loads(manifest_path.read_text())
    for rec, on_disk in zip(three, raw["versions"], strict=True):
        assert not {"train_files", "val_files", "skipped_files", "new_chunk_rows"} & set(on_disk)
        assert on_disk["files"] == {"train": 4, "val": 1, "skipped": 0, "chunks": len(rec["new_chunk_rows"])}
        assert on_disk["files_path"] == f"./run/{rec['name']}/files.json"
    # Read back: the records preparing returned, the lists one version at a time.
    whole = [version_files(r) for r in read_manifest(manifest_path)["versions"]]
    assert whole == [version_files(r) for r in three] and whole[:2] == two
    assert not {"train_files", "val_files", "skipped_files"} & set(read_manifest(manifest_path)["versions"][0])
    assert len(three[2]["train_files"]) == 4 and len(three[2]["train_files"][0]["sha256"]) == 64

    # A manifest that still lists the files inline (written before) is split on its next write.
    inline = {**raw, "versions": [{k: v for k, v in r.items() if k not in ("files", "files_path")}
                                  for r in two]}
    write_json(manifest_path, inline, root=tmp_path)
    v1_list.unlink()
    again = prepare_versions(discover_versions(corpus), spec)  # v3 prepared again
    assert [version_files(r) for r in again] == whole
    assert json.loads(manifest_path.read_text())["versions"][0]["files_path"] == "./run/v1/files.json"
    assert [version_files(r) for r in read_manifest(manifest_path)["versions"]] == whole

    # A missing list is named, with the manifest that names it.
    v1_list.unlink()
    with pytest.raises(DataError, match=r"v1/files.json: version v1's file list is missing"):
        prepare_versions(discover_versions(corpus), spec)


def test_preparing_logs_progress_with_an_eta_in_every_pass(ray_cluster, tmp_path, tokenizer_dir, monkeypatch, caplog):
    """Tokenizing and shuffling a large corpus take hours: each pass logs how much is done, its
    rate and an ETA (here at every finished task; every 30 s by default). Validating the files
    does too (:func:`test_a_progress_line_counts_ray_tasks_as_they_finish`)."""
    import logging
    import re

    from raypath import console

    monkeypatch.setattr(console, "PROGRESS_EVERY_S", 0.0)
    caplog.set_level(logging.INFO, logger="raypath")
    corpus = _corpus(tmp_path / "corpus", versions=2)
    prepare_versions(discover_versions(corpus), _spec(tmp_path / "run", tokenizer_dir))
    lines = [r.getMessage() for r in caplog.records]
    number, eta = r"[\d.]+k?", r"ETA (\d+m\d\ds|\d+h\d\dm|\?)$"
    passes = {"tokenizing v1, v2": f"{number} k?B of {number} kB \\(\\d+%\\), {number} k?B/s, "
                                   f"{number} tokens \\({number}/s\\), ",
              "shuffling v2's stream \\(reading\\)": f"\\d+ of \\d+ files \\(\\d+%\\), {number} files/s, "
                                                      f"{number} blocks \\({number}/s\\), ",
              "shuffling v2's stream \\(writing\\)": f"\\d+ of \\d+ shards \\(\\d+%\\), {number} shards/s, "
                                                      f"{number} blocks \\({number}/s\\), "}
    for what, done in passes.items():
        pattern = re.compile(f"^{what}: {done}{eta}")
        assert any(pattern.match(line) for line in lines), (what, [ln for ln in lines if ln.startswith(what[:9])])


def test_a_progress_line_counts_ray_tasks_as_they_finish(ray_cluster, monkeypatch, caplog):
    """How the files' validation reports: tasks counted as they finish, results in their order."""
    import logging
    import re
    import time

    import ray

    from raypath import console

    @ray.remote(num_cpus=0)
    def nap(i: int) -> int:
        time.sleep(0.3 * i)
        return i

    monkeypatch.setattr(console, "PROGRESS_EVERY_S", 0.1)
    log = logging.getLogger("raypath.test")
    caplog.set_level(logging.INFO, logger="raypath.test")
    assert console.Progress(log, "napping", 4, "tasks").get([nap.remote(i) for i in (4, 1, 3, 2)]) == [4, 1, 3, 2]
    lines = [r.getMessage() for r in caplog.records]
    assert lines and all(line.startswith("napping: ") and " of 4 tasks (" in line for line in lines), lines
    partly = re.compile(r"napping: [123] of 4 tasks \(\d+%\), [\d.]+ tasks/s, ETA \dm\d\ds$")
    assert any(partly.match(line) for line in lines), lines


# ---------------------------------------------------------------- old run directories

def _to_old_layout(rec: dict) -> dict:
    """A version record and its files as raypath wrote them before the sharded layout."""
    from raypath.data import _write_blocks

    out = {k: v for k, v in rec.items()
           if k not in ("layout", "new_chunk_rows", "stream_shards", "dropped_share", "files", "files_path")}
    for kind in ("new", "stream", "val"):
        table = pq.read_table(rec[f"{kind}_path"])
        if "idx" in table.column_names:
            table = table.sort_by("idx")
        tokens = read_blocks(rec[f"{kind}_path"])
        path = Path(rec[f"{kind}_path"]).with_name(f"{kind}.parquet")
        _write_blocks(path, tokens, table["src"].to_numpy() if kind == "stream" else None)
        shutil.rmtree(rec[f"{kind}_path"])
        out[f"{kind}_path"] = str(path)
    return out


def test_an_old_single_file_layout_is_extended_with_replay(ray_cluster, tmp_path, tokenizer_dir):
    corpus = _corpus(tmp_path / "corpus")
    spec = _spec(tmp_path / "run", tokenizer_dir)
    two = prepare_versions(discover_versions(corpus)[:2], spec)
    manifest_path = tmp_path / "run" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["versions"] = [_to_old_layout(r) for r in two]
    manifest_path.write_text(json.dumps(manifest))

    recs = prepare_versions(discover_versions(corpus), spec)
    reference = prepare_versions(discover_versions(corpus), _spec(tmp_path / "ref", tokenizer_dir))
    assert [r["stream_path"].endswith(".parquet") for r in recs] == [True, True, False]
    assert Path(recs[0]["new_path"]).name == "new"  # rewritten once for replay
    # Same rows replayed as from the sharded layout (the old file is one chunk per version,
    # so only the draws' row ids differ, not their number or sources).
    assert recs[2]["replay_blocks"] == reference[2]["replay_blocks"]
    assert recs[2]["stream_rows"] == reference[2]["stream_rows"]
    assert read_blocks(recs[1]["stream_path"]).shape == read_blocks(reference[1]["stream_path"]).shape


@pytest.mark.slow  # trains v4 on the upgraded run: ~2 min on 2 CPUs
def test_an_old_layout_run_resumes_and_extends(tiny_run_copy, tmp_path):
    """A finished run directory of the single-file layout trains its next version."""
    from raypath.run import run

    cfg = tiny_run_copy
    manifest_path = Path(cfg.run_dir) / "data" / "manifest.json"
    manifest = read_manifest(manifest_path)  # absolute paths and inline file lists, as the old layout wrote them
    manifest["versions"] = [_to_old_layout(version_files(r)) for r in manifest["versions"]]
    manifest_path.write_text(json.dumps(manifest))
    lineage_path = Path(cfg.run_dir) / "lineage.json"
    lineage = json.loads(lineage_path.read_text())
    lineage["versions"] = manifest["versions"]
    lineage_path.write_text(json.dumps(lineage))

    from raypath.config import load_config

    extended = load_config(ROOT / "configs" / "tiny.yaml", [f"run_dir={cfg.run_dir}",
                                                            "data.versions=[v1, v2, v3, v4]"])
    result = run(extended).data
    assert [m["version"] for m in result["main_path"]] == ["v1", "v2", "v3", "v4"]
    assert result["versions"][3]["stream_path"].endswith("stream")  # the new version is sharded
    assert result["versions"][0]["stream_path"].endswith("stream.parquet")


# ---------------------------------------------------------------- object storage

PREPARE = """
import json, sys
from raypath.cluster import init_ray
from raypath.config import load_config
from raypath.data import read_manifest, version_files
from raypath.run import prepare
init_ray(num_cpus=4)
ctx = prepare(load_config(sys.argv[1], sys.argv[2:]))
print(json.dumps([version_files(v) for v in read_manifest(ctx.run_dir / "data" / "manifest.json")["versions"]]))
"""


def _prepare_subprocess(s3, run_dir: Path, corpus: str, tok: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, **AWS_ENV, "RAY_AUTH_MODE": "disabled", "AWS_ENDPOINT_URL": s3.endpoint}
    args = [sys.executable, "-c", PREPARE, str(ROOT / "configs" / "tiny.yaml"), f"run_dir={run_dir}",
            f"data.corpus={corpus}", "data.versions=[v1, v2]", f"data.tokenizer={tok}", "data.seq_len=16",
            "data.replay_ratio=0.25", "train.global_batch_size=4", "data.val_blocks=6"]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)


@pytest.mark.slow  # three processes with a Ray cluster each: ~3 min on 2 CPUs
def test_a_corpus_on_s3_prepares_like_the_same_files_on_disk(s3, tmp_path, tokenizer_dir):
    """``data.corpus: s3://...`` against a real S3 API (moto on loopback), in a fresh process
    with its own Ray cluster (the nodes read the bucket with their own credentials)."""
    import pyarrow.fs as pafs

    corpus = _corpus(tmp_path / "corpus", versions=2)
    name = bucket(s3, "corpus")
    pafs.copy_files(str(corpus), f"{name}/c", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=s3.fs)
    remote = _prepare_subprocess(s3, tmp_path / "remote", f"s3://{name}/c", tokenizer_dir, tmp_path)
    assert remote.returncode == 0, remote.stderr[-3000:]
    local = _prepare_subprocess(s3, tmp_path / "local", str(corpus), tokenizer_dir, tmp_path)
    assert local.returncode == 0, local.stderr[-3000:]
    rv, lv = json.loads(remote.stdout.splitlines()[-1]), json.loads(local.stdout.splitlines()[-1])
    assert rv[1]["train_files"][0]["path"].startswith(f"s3://{name}/c/v2/train/")
    assert "sha256" not in rv[1]["train_files"][0] and rv[1]["train_files"][0]["bytes"] > 0
    for r, lo in zip(rv, lv):
        assert _files(Path(r["stream_path"])) == _files(Path(lo["stream_path"]))

    # A trained version's object replaced in the bucket: named on the next run.
    key = f"{name}/c/v1/train/part-1.jsonl"
    with s3.fs.open_output_stream(key) as f:
        f.write(b'{"text": "replaced"}\n')
    again = _prepare_subprocess(s3, tmp_path / "remote", f"s3://{name}/c", tokenizer_dir, tmp_path)
    assert again.returncode != 0 and f"s3://{key}: content changed" in again.stderr


ON_ANOTHER_NODE = """
import json, shutil, sys
from pathlib import Path
import raypath.data as data, raypath.run as run
from raypath.cluster import init_ray
from raypath.config import load_config

mirror = Path(sys.argv[1])  # cluster.local_dir

def bare(module, name, *dirs):
    # The step's Ray tasks find the run directory's ``dirs`` missing from the mirror, as on any
    # node but the driver's (one machine's nodes share its disk, which would hide that).
    step = getattr(module, name)
    def call(*args):
        for d in dirs:
            shutil.rmtree(mirror / d)
        return step(*args)
    setattr(module, name, call)

bare(data, "inspect_files", "corpus")
bare(run, "_train_tokenizer", "corpus")
bare(data, "tokenize_chunks", "corpus", "tokenizer")
init_ray(num_cpus=4)
print(json.dumps(run.prepare(load_config(sys.argv[2], sys.argv[3:])).versions))
"""


@pytest.mark.slow  # two processes with a Ray cluster each: ~2 min on 2 CPUs
def test_a_run_directory_in_a_bucket_prepares_on_nodes_that_lack_its_corpus_and_tokenizer(s3, tmp_path):
    """With ``run_dir: s3://...``, the embedded corpus and the tokenizer trained on it live in the
    driver's mirror; tasks on other nodes must pull them from the bucket, not expect them on disk."""
    name = bucket(s3, "bare")
    env = {**os.environ, **AWS_ENV, "RAY_AUTH_MODE": "disabled", "AWS_ENDPOINT_URL": s3.endpoint}
    args = [str(ROOT / "configs" / "tiny.yaml"), "data.versions=[v1, v2]"]
    mirror = tmp_path / "mirror"
    remote = subprocess.run([sys.executable, "-c", ON_ANOTHER_NODE, str(mirror), *args, f"run_dir=s3://{name}/r",
                             f"cluster.local_dir={mirror}"],
                            env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert remote.returncode == 0, remote.stderr[-3000:]
    local = subprocess.run([sys.executable, "-c", PREPARE, *args, f"run_dir={tmp_path / 'local'}"],
                           env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert local.returncode == 0, local.stderr[-3000:]
    for k in ("v1", "v2"):  # the same stream as a local run's
        objects = sorted(o for o in s3.files(f"{name}/r/data/{k}/stream") if o.endswith(".parquet"))
        expected = _files(tmp_path / "local" / "data" / k / "stream")
        assert objects and [s3.read(o) for o in objects] == list(expected.values())


# ---------------------------------------------------------------- held-out test split

def test_held_out_counts_keep_val_first_and_share_short_files():
    from raypath.data import held_out_counts

    assert held_out_counts(100, 6, 5) == (6, 5)  # enough: val first, test the next blocks
    assert held_out_counts(12, 6, 6) == (6, 6)
    assert held_out_counts(100, 6, 0) == (6, 0)  # no test split asked for
    assert held_out_counts(4, 6, 0) == (4, 0)
    assert held_out_counts(10, 6, 6) == (5, 5)  # short: shared in proportion
    assert held_out_counts(3, 32, 32) == (2, 1)
    assert held_out_counts(5, 8, 8) == (3, 2)  # val's half rounded up, not to even (2, 3)
    assert held_out_counts(1, 4, 4) == (1, 0)  # val keeps its one block
    assert held_out_counts(0, 4, 4) == (0, 0)  # none: refused by the caller, not (1, -1)


def test_test_split_is_carved_after_val_or_read_from_a_test_folder(ray_cluster, tmp_path, tokenizer_dir):
    corpus = _corpus(tmp_path / "corpus", versions=1, files=1)

    def prep(name: str, **kw) -> dict:
        return prepare_versions(discover_versions(corpus), _spec(tmp_path / name, tokenizer_dir, **kw))[0]

    none, carved = prep("none", test_blocks=0), prep("carved", test_blocks=5)
    assert "test_path" not in none and none["test_blocks"] == 0
    assert carved["test_from"] == "val" and carved["test_blocks"] == 5 and carved["val_blocks"] == 6
    assert _files(Path(none["val_path"])) == _files(Path(carved["val_path"]))  # val unchanged by a test split
    test = read_blocks(carved["test_path"])
    assert len(test) == 5
    wide = prep("wide", val_blocks=11, test_blocks=0)  # test = the 5 blocks right after val's
    assert np.array_equal(read_blocks(wide["val_path"])[6:], test)

    _write_jsonl(corpus / "v1" / "test" / "part-0.jsonl", _docs(9, 6))
    folder = prep("folder", test_blocks=5)
    assert folder["test_from"] == "test" and [f["path"] for f in folder["test_files"]] == \
        [str(corpus / "v1" / "test" / "part-0.jsonl")]
    assert _files(Path(folder["val_path"])) == _files(Path(carved["val_path"]))
    own = read_blocks(folder["test_path"])
    assert len(own) == 5 and not np.array_equal(own, test)
    assert not (Path(folder["val_path"]).parent / "test-parts").exists()
    # the test files are checked like the others once trained on
    (corpus / "v1" / "test" / "part-0.jsonl").write_text("")
    with pytest.raises(DataError, match="test/part-0.jsonl"):
        prep("folder", test_blocks=5)


def test_a_refused_version_plan_leaves_the_last_runs_config_yaml(tmp_path):
    """``RUN_DIR/config.yaml`` is the config of the last run: one whose versions the data
    manifest refuses (a trained version reordered) never ran, yet it was written over it."""
    from conftest import tiny_config

    from raypath.run import prepare

    corpus = _corpus(tmp_path / "corpus", versions=2, files=1, parquet=False)
    run_dir = tmp_path / "run"
    write_json(run_dir / "data" / "manifest.json", {"versions": [{"name": "v1"}]})
    (run_dir / "config.yaml").write_text("name: the last run\n")
    cfg = tiny_config(run_dir, f"data.corpus={corpus}", "data.versions=[v2, v1]")
    with pytest.raises(DataError, match="versions can only be appended"):
        prepare(cfg)  # refused before anything needs Ray
    assert (run_dir / "config.yaml").read_text() == "name: the last run\n"


def test_a_tokenizer_left_by_a_run_that_prepared_no_version_is_trained_again_on_what_v1_now_holds(
        ray_cluster, tmp_path):
    """A first attempt whose version 1 is refused after the tokenizer is trained (too few blocks)
    leaves the tokenizer of that text; the run on the corrected version 1 must not tokenize with it."""
    from conftest import tiny_config

    from raypath.run import prepare
    from raypath.tokenizer import TRAIN_INFO_NAME

    corpus, run_dir = tmp_path / "corpus", tmp_path / "run"
    for split in ("train", "val"):
        _write_jsonl(corpus / "v1" / split / "part-0.jsonl", ["a short first try"])
    cfg = tiny_config(run_dir, f"data.corpus={corpus}", "data.versions=[v1]")
    with pytest.raises(DataError, match="version v1: 0 blocks"):
        prepare(cfg)
    first = (run_dir / "tokenizer" / "tokenizer.json").read_bytes()

    shutil.rmtree(corpus / "v1")
    _corpus(corpus, versions=1, files=2, parquet=False)
    ctx = prepare(cfg)
    assert (run_dir / "tokenizer" / "tokenizer.json").read_bytes() != first
    assert ctx.vocab_size > len(json.loads(first)["model"]["vocab"])  # learnt merges of the text v1 holds now
    info = json.loads((run_dir / "tokenizer" / TRAIN_INFO_NAME).read_text())
    assert [Path(f["path"]).name for f in info["trained_on"]["files"]] == ["part-0.jsonl", "part-1.jsonl"]
    trained = (run_dir / "tokenizer" / "tokenizer.json").stat().st_mtime_ns
    prepare(cfg)  # v1 prepared: the tokenizer it was tokenized with stays
    assert (run_dir / "tokenizer" / "tokenizer.json").stat().st_mtime_ns == trained
