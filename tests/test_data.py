"""The data pipeline: packing, manifest, replay, bad input, exact resume across world sizes."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from raypath.mirror import LOCAL, RunDir
from raypath.data import Consumed, DataError, PrepareSpec, discover_versions, pack, prepare_versions, read_blocks
from raypath.sources import Chunk, apply_policy, inspect_file


def validate_files(files, column, policy, max_doc_chars=0):
    """Validate in-process (what the Ray tasks run), then apply the policy."""
    keep, skipped = apply_policy([inspect_file(f, column, max_doc_chars) for f in files], policy)
    return tuple(r["path"] for r in keep), skipped

# ---------------------------------------------------------------- pure functions


def test_consumed_intervals_merge_and_mask():
    c = Consumed()
    c.add(np.array([5, 3, 4, 10, 11]))
    assert c.intervals == [[3, 6], [10, 12]]
    c.merge(Consumed.from_list([[6, 10]]))
    assert c.intervals == [[3, 12]] and len(c) == 9
    assert c.mask(np.array([2, 3, 11, 12])).tolist() == [False, True, True, False]
    c.add(np.array([3, 4]))  # re-adding consumed rows changes nothing
    assert len(c) == 9


def test_the_shuffle_writes_one_map_file_per_input_file_and_a_shard_reads_its_rows_by_range(tmp_path):
    """However many shards, the map side writes one temporary file per input part file, and a
    shard's byte range of it holds exactly the input rows the hash sends to that shard."""
    from raypath.bucketed import BucketedFiles
    from raypath.data import StreamSpec, _map_file, _scatter
    from raypath.shuffle import bucket_of, hash64

    fs, block, shards = pafs.LocalFileSystem(), 9, 16
    rng = np.random.default_rng(0)
    files = []
    for c, rows in enumerate([50, 70, 3]):
        tokens = pa.FixedSizeListArray.from_arrays(pa.array(rng.integers(0, 99, rows * block, dtype=np.int32)), block)
        files.append(str(tmp_path / f"part-{c:06d}.parquet"))
        pq.write_table(pa.table({"row": (np.int64(c) << 32) + np.arange(rows, dtype=np.int64),
                                 "src": np.full(rows, 1, np.int16), "tokens": tokens}), files[-1])
    tmp = str(tmp_path / "stream.tmp")
    counts = _scatter(pa.table({"map": [0, 1, 2], "file": files}), StreamSpec(key=7, buckets=shards, own=(1,)), tmp, fs)
    assert sorted(p.name for p in Path(tmp).iterdir()) == ["m000000.arrows", "m000001.arrows", "m000002.arrows"]
    before = Path(_map_file(tmp, 1)).read_bytes()
    _scatter(pa.table({"map": [1], "file": [files[1]]}), StreamSpec(key=7, buckets=shards, own=(1,)), tmp, fs)
    assert len(list(Path(tmp).iterdir())) == 3 and Path(_map_file(tmp, 1)).read_bytes() == before  # a retry
    per_bucket, nonempty = np.zeros(shards, np.int64), 0
    maps = BucketedFiles(fs, [_map_file(tmp, i) for i in range(3)], 3, shards - 1, shards)  # a run from shard 3 on
    # Read in windows of consecutive shards, each one ranged read per map file: here ~3 shards' bytes each.
    run_bytes = int(np.diff(maps.offsets, axis=1).sum())
    windows = maps.windows(budget=run_bytes // 4)
    assert windows[0][0] == 3 and windows[-1][1] == shards - 1 and 3 <= len(windows) <= 6, windows
    assert all(a[1] + 1 == b[0] for a, b in zip(windows, windows[1:])), windows
    assert maps.windows(budget=0) == [(b, b) for b in range(3, shards)]  # at least a shard a window
    # bytes held beside a shard's pieces (per shard) count against the budget too
    assert maps.windows(budget=run_bytes, extra=np.full(shards - 3, run_bytes)) == [(b, b) for b in range(3, shards)]
    got = {}
    for lo, hi in windows:
        maps.read(lo, hi)
        got.update({b: [None if (p := maps.piece(i, b)) is None else pa.ipc.open_stream(p).read_all() for i in range(3)]
                    for b in range(lo, hi + 1)})
    for i, path in enumerate(files):
        src = pq.read_table(path)
        want = bucket_of(hash64(7, src["src"].to_numpy(), src["row"].to_numpy()), shards)
        per_bucket += np.bincount(want, minlength=shards)
        nonempty += len(np.unique(want))
        for b in range(3, shards):
            piece, rows = got[b][i], np.flatnonzero(want == b)
            if not len(rows):
                assert piece is None
                continue
            order = np.argsort(piece["row"].to_numpy())
            assert piece["row"].to_numpy()[order].tolist() == src["row"].to_numpy()[rows].tolist()
            assert (np.stack(piece["tokens"].to_numpy(zero_copy_only=False))[order]
                    == np.stack(src["tokens"].to_numpy(zero_copy_only=False))[rows]).all()
    assert np.bincount(counts["bucket"].to_numpy(), weights=counts["n"].to_numpy(), minlength=shards).tolist() == \
        per_bucket.tolist()
    assert len(counts) == nonempty < 3 * shards  # a file's empty shards: no bytes, no count row


def test_reduce_tasks_take_runs_of_consecutive_shards_but_leave_every_cpu_two():
    from raypath.bucketed import BUCKETS_PER_TASK, runs

    shards = [0, 1, 2, 5, 6, 9, 10, 11, 12, 13]
    assert runs(shards, cpus=1) == [{"first": 0, "last": 6}, {"first": 9, "last": 13}]  # 2 tasks, 5 each
    assert runs(shards, cpus=8) == [{"first": b, "last": b} for b in shards]
    got = runs(list(range(1000)), cpus=2)
    assert len(got) == 1000 // BUCKETS_PER_TASK + 1 and got[-1] == {"first": 992, "last": 999}


def test_pack_puts_eos_between_documents_and_counts_the_tail():
    blocks, stats = pack([[1, 2, 3], [], [4, 5], [6]], block=3, eos=0)
    assert blocks.tolist() == [[1, 2, 3], [0, 4, 5], [0, 6, 0]]
    assert stats == {"docs": 3, "doc_tokens": 9, "blocks": 3, "dropped_tokens": 0}
    blocks, stats = pack([[1, 2, 3, 4]], block=3, eos=0)
    assert blocks.tolist() == [[1, 2, 3]] and stats["dropped_tokens"] == 2


# ---------------------------------------------------------------- corpora on disk

TEXT = ("def f(x):\n    return x + 1\n" * 40, "Plain English prose about trains. " * 60)


def _write_jsonl(path: Path, docs, gz=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    path.write_bytes(gzip.compress(data) if gz else data)


def _corpus(root: Path, n_versions=3, docs_per_version=12) -> Path:
    for k in range(n_versions):
        docs = [f"version {k} doc {i}\n" + TEXT[k % 2] for i in range(docs_per_version)]
        gz = k == 1  # users bring compressed jsonl too
        _write_jsonl(root / f"v{k + 1}" / "train" / ("part-0.jsonl.gz" if gz else "part-0.jsonl"), docs[:-2], gz=gz)
        _write_jsonl(root / f"v{k + 1}" / "val" / "part-0.jsonl", docs[-2:])
    # one version in parquet, the format users bring at scale
    v3 = root / "v3" / "train"
    if n_versions >= 3:
        pq.write_table(pa.table({"text": [f"parquet doc {i} " + TEXT[0] for i in range(10)]}), v3 / "part-1.parquet")
    return root


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from raypath.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(list(TEXT) * 4, 300, out)
    return str(out)


def _spec(tmp_path, tokenizer_dir, **kw) -> PrepareSpec:
    base = dict(data_dir=str(tmp_path / "data"), tokenizer_dir=tokenizer_dir, seq_len=16, text_column="text",
                val_blocks=4, replay_ratio=0.0, seed=0, actors=1, min_blocks=4)
    return PrepareSpec(**{**base, **kw})


def test_prepare_writes_manifest_and_is_deterministic(ray_cluster, tmp_path, tokenizer_dir):
    corpus = _corpus(tmp_path / "corpus")
    recs = prepare_versions(discover_versions(corpus), _spec(tmp_path / "a", tokenizer_dir, replay_ratio=0.25))
    manifest = json.loads((tmp_path / "a" / "data" / "manifest.json").read_text())
    assert [v["name"] for v in manifest["versions"]] == ["v1", "v2", "v3"]
    v3 = recs[2]
    assert len(v3["train_files"]) == 2 and all(len(f["sha256"]) == 64 for f in v3["train_files"])
    assert v3["new_tokens"] == v3["new_blocks"] * 17
    # replay: 25% of the final stream drawn from older versions, recorded per source
    assert recs[0]["replay_blocks"] == 0
    assert v3["replay_blocks"] == round(0.25 / 0.75 * v3["new_blocks"])
    src = pq.read_table(v3["stream_path"], columns=["src"]).column("src").to_numpy()
    assert (src < 2).sum() == v3["replay_blocks"]
    assert {int(k): c for k, c in v3["replay_from"].items()} == {int(s): int((src == s).sum()) for s in (0, 1)}
    # same inputs, same seed -> byte-identical token streams
    again = prepare_versions(discover_versions(corpus), _spec(tmp_path / "b", tokenizer_dir, replay_ratio=0.25))
    for a, b in zip(recs, again):
        assert np.array_equal(read_blocks(a["stream_path"]), read_blocks(b["stream_path"]))


def test_changed_or_missing_earlier_file_is_named(ray_cluster, tmp_path, tokenizer_dir):
    corpus = _corpus(tmp_path / "corpus", n_versions=2)
    spec = _spec(tmp_path, tokenizer_dir)
    prepare_versions(discover_versions(corpus), spec)
    target = corpus / "v1" / "train" / "part-0.jsonl"
    target.write_bytes(target.read_bytes() + b'{"text": "sneaky edit"}\n')
    with pytest.raises(DataError, match="part-0.jsonl.*changed"):
        prepare_versions(discover_versions(corpus), spec)
    target.unlink()
    (corpus / "v1" / "train" / "part-0b.jsonl").write_text('{"text": "moved"}\n')
    with pytest.raises(DataError, match="part-0.jsonl"):
        prepare_versions(discover_versions(corpus), spec)


def test_earlier_files_are_checked_by_their_listing_and_a_changed_one_by_its_contents(
        ray_cluster, tmp_path, tokenizer_dir, monkeypatch):
    """A new run checks every earlier version's files; discovery listed them, so those whose
    listed size and mtime are the recorded ones need no stat or task of their own. An edit
    that keeps the size is still caught: its mtime moved, so its contents are hashed."""
    import os

    import ray

    from raypath import data

    corpus = _corpus(tmp_path / "corpus", n_versions=2)
    spec = _spec(tmp_path, tokenizer_dir)
    records = prepare_versions(discover_versions(corpus), spec)
    checked = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # the checks in this process, counted
    monkeypatch.setattr(data, "_unchanged_here", lambda rec, *a: checked.append(rec["path"]) or data.unchanged(rec))
    sources = discover_versions(corpus)
    for rec, src in zip(records, sources):
        data._check_unchanged(data._recorded_files(rec, src), src, None, spec.rd)
    assert checked == [] and sum(len(r["train_files"]) + len(r["val_files"]) for r in records) >= 4
    # A run's start reads the manifest without the fingerprints and checks one version's at a time.
    seen = []
    manifest = data.check_prepared(sources, spec.data_dir, spec.seq_len,
                                   each=lambda files, src: seen.append((src.name, sorted(f["path"] for f in files))))
    assert seen == [(r["name"], sorted(f["path"] for f in r["train_files"] + r["val_files"])) for r in records]
    assert all(not {"train_files", "val_files"} & set(r) and r["new_chunk_rows"] for r in manifest["versions"])

    target = corpus / "v1" / "train" / "part-0.jsonl"
    text = target.read_bytes()
    assert b"doc 0" in text
    target.write_bytes(text.replace(b"doc 0", b"doc 9", 1))
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))
    with pytest.raises(DataError, match="part-0.jsonl: content changed \\(sha256 differs"):
        src = discover_versions(corpus)[0]
        data._check_unchanged(data._recorded_files(records[0], src), src, None, spec.rd)
    assert checked == [str(target)]


def test_a_stores_listing_and_its_head_agree_on_the_second():
    """S3 may list LastModified in milliseconds; a HEAD, which recorded it, gives whole seconds."""
    from raypath.sources import same_file

    second = 1_796_655_956 * 10**9
    remote = {"path": "s3://corpus/v1/train/a.jsonl", "bytes": 10, "mtime_ns": second}
    local = {**remote, "path": "/corpus/v1/train/a.jsonl"}
    assert same_file(remote, 10, second + 123_000_000) and not same_file(local, 10, second + 123_000_000)
    assert same_file(local, 10, second) and not same_file(remote, 11, second)
    assert not same_file(remote, 10, second + 10**9) and not same_file(remote, 10, None)


def test_a_moved_corpus_is_checked_where_it_now_is(ray_cluster, tmp_path, tokenizer_dir):
    """Its trained versions' files are found by split and name, their contents checked there."""
    corpus = _corpus(tmp_path / "corpus", n_versions=3)
    spec = _spec(tmp_path, tokenizer_dir)
    before = prepare_versions(discover_versions(corpus, ["v1", "v2"]), spec)
    moved = tmp_path / "elsewhere" / "corpus"
    moved.parent.mkdir()
    shutil.move(corpus, moved)
    after = prepare_versions(discover_versions(moved), spec)  # v3 appended from the new place
    assert [r["name"] for r in after] == ["v1", "v2", "v3"]
    assert [r["stream_path"] for r in after[:2]] == [r["stream_path"] for r in before]  # not prepared again
    target = moved / "v1" / "train" / "part-0.jsonl"
    target.write_bytes(target.read_bytes() + b'{"text": "sneaky edit"}\n')
    with pytest.raises(DataError, match=f"{moved}/v1/train/part-0.jsonl.*changed"):
        prepare_versions(discover_versions(moved), spec)


# ---------------------------------------------------------------- bad input

def _bad_files(d: Path) -> dict[str, Path]:
    d.mkdir(parents=True, exist_ok=True)
    files = {
        "empty": d / "empty.jsonl",
        "unreadable_parquet": d / "broken.parquet",
        "missing_column": d / "nocol.parquet",
        "non_utf8": d / "latin1.jsonl",
        "bad_json": d / "badjson.jsonl",
        "lone_surrogate": d / "surrogate.jsonl",
    }
    files["empty"].write_bytes(b"")
    files["unreadable_parquet"].write_bytes(b"PAR1 this is not parquet")
    pq.write_table(pa.table({"content": ["hello"]}), files["missing_column"])
    files["non_utf8"].write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    files["bad_json"].write_bytes(b'{"text": "ok"}\n{"text": \n')
    # Valid JSON and valid UTF-8, yet no str a tokenizer (or UTF-8 writer) accepts.
    files["lone_surrogate"].write_bytes(b'{"text": "ok"}\n{"text": "broken \\ud800 escape"}\n')
    return files


@pytest.mark.parametrize("kind,needle", [
    ("empty", "empty"), ("unreadable_parquet", "not a readable parquet"), ("missing_column", "no 'text' column"),
    ("non_utf8", "line 2: not valid UTF-8"), ("bad_json", "line 2: not valid JSON"),
    ("lone_surrogate", "line 2: text is not valid Unicode (lone surrogate U+D800"),
])
def test_bad_file_errors_name_the_file(tmp_path, kind, needle):
    f = _bad_files(tmp_path)[kind]
    with pytest.raises(DataError) as e:
        validate_files((str(f),), "text", policy="error", max_doc_chars=0)
    assert f.name in str(e.value) and needle in str(e.value)


def test_bad_files_are_skipped_and_bad_documents_of_usable_ones_alone(tmp_path, caplog):
    files = _bad_files(tmp_path)
    good = tmp_path / "good.jsonl"
    _write_jsonl(good, ["fine"])
    with caplog.at_level("WARNING", logger="raypath.sources"):
        keep, skipped = validate_files(tuple(map(str, [*files.values(), good])), "text", policy="skip")
    # a good line and a bad one: the file is kept, its bad line dropped when tokenized (counted)
    with_bad_line = ("non_utf8", "bad_json", "lone_surrogate")
    assert set(keep) == {str(good), *(str(files[k]) for k in with_bad_line)}
    assert {Path(s["path"]).name for s in skipped} == {files[k].name for k in files if k not in with_bad_line}
    assert all(s["reason"] for s in skipped)
    assert f"{files['bad_json']}: skipping 1 bad document(s) of 2 (the first: line 2: not valid JSON" in caplog.text


def test_files_that_iter_docs_reads_pass_validation(tmp_path):
    """Files iter_docs reads fine must not be rejected by the structure check before it."""
    schema = pa.schema([("text", pa.string())])
    stream = tmp_path / "empty-first-batch.arrow"  # a writer that flushed before its first row
    with pa.OSFile(str(stream), "wb") as f, pa.ipc.new_stream(f, schema) as w:
        w.write_batch(pa.record_batch([pa.array([], pa.string())], schema=schema))
        w.write_batch(pa.record_batch([pa.array(["doc one", "doc two"])], schema=schema))
    category = tmp_path / "category.parquet"  # what a pandas category column writes
    pq.write_table(pa.table({"text": pa.array(["doc one", "doc two", "doc one"]).dictionary_encode()}), category)
    bom = tmp_path / "bom.jsonl"  # saved by a Windows editor
    bom.write_bytes(b"\xef\xbb\xbf" + b'{"text": "doc one"}\n{"text": "doc two"}\n')
    for path, docs in ((stream, 2), (category, 3), (bom, 2)):
        report = inspect_file(str(path), "text")
        assert (report["problem"], report["docs"]) == (None, docs), path.name


def test_a_json_line_nested_past_the_parsers_depth_is_that_lines_problem(tmp_path):
    deep = tmp_path / "deep.jsonl"  # json.loads raises RecursionError here, not JSONDecodeError
    deep.write_text('{"text": "doc one"}\n{"text": "doc two", "x": ' + "[" * 5000 + "]" * 5000 + "}\n")
    report = inspect_file(str(deep), "text")
    assert (report["problem"], report["bad_docs"]) == (None, 1)  # one bad document of a usable file
    assert report["first_bad"].startswith("line 2: not valid JSON")


def test_versions_are_ordered_with_numbers_compared_as_numbers(tmp_path):
    for name in ("v1", "v10", "v2", "v9", "v11"):
        _write_jsonl(tmp_path / "c" / name / "train" / "a.jsonl", ["doc"])
        _write_jsonl(tmp_path / "c" / name / "val" / "a.jsonl", ["doc"])
    assert [v.name for v in discover_versions(tmp_path / "c")] == ["v1", "v2", "v9", "v10", "v11"]
    from raypath.sources import version_order

    dated = ["2024-11", "2024-05", "2023-12"]  # zero-padded dates keep their text order
    assert sorted(dated, key=version_order) == ["2023-12", "2024-05", "2024-11"]


def test_a_new_version_in_the_wrong_layout_is_refused_not_skipped(tmp_path):
    for name in ("v1", "v2"):
        _write_jsonl(tmp_path / "c" / name / "train" / "a.jsonl", ["doc"])
        _write_jsonl(tmp_path / "c" / name / "val" / "a.jsonl", ["doc"])
    (tmp_path / "c" / ".cache").mkdir()  # hidden: not a version
    _write_jsonl(tmp_path / "c" / "v3" / "train.jsonl", ["doc"])  # files straight in v3/: was trained never
    with pytest.raises(DataError, match=r"c/v3: a version needs v3/train/ and v3/val/ \(found no train/\)"):
        discover_versions(tmp_path / "c")
    assert [v.name for v in discover_versions(tmp_path / "c", ["v1", "v2"])] == ["v1", "v2"]  # listed: the rest aside


@pytest.mark.parametrize("name, needle", [
    ("notes.txt", "unsupported file type"), ("more.jsonl.zst", "unsupported file type"),
    ("MORE.JSONL", "unsupported file type"), ("shard-1/", "a sub-directory in a split directory is not read"),
    ("moved.jsonl@", "a broken symbolic link"),
])
def test_a_file_the_reader_would_not_read_is_refused_by_name_not_left_untrained(tmp_path, name, needle):
    for split in ("train", "val"):
        _write_jsonl(tmp_path / "c" / "v1" / split / "a.jsonl", ["doc"])
    train = tmp_path / "c" / "v1" / "train"
    for ignored in (".DS_Store", "_SUCCESS", "dataset_info.json", "state.json"):  # not data: no error
        (train / ignored).write_text("{}")
    assert [Path(f).name for f in discover_versions(tmp_path / "c")[0].train_files] == ["a.jsonl"]
    if name.endswith("/"):
        _write_jsonl(train / name / "b.jsonl", ["doc"])
    elif name.endswith("@"):  # a link whose target was moved away
        name = name[:-1]
        (train / name).symlink_to(tmp_path / "elsewhere.jsonl")
    else:
        (train / name).write_text('{"text": "doc"}\n')
    with pytest.raises(DataError, match=f"{train / name.rstrip('/')}: {needle}"):
        discover_versions(tmp_path / "c")


def test_a_gcs_uri_gives_up_within_seconds_not_after_fifteen_minutes():
    import datetime

    from raypath.sources import GCS_RETRY_S, uri_filesystem

    fs, path = uri_filesystem("gs://bucket/runs/a")
    settings = fs.__reduce__()[1][0]  # what a pickled copy (a Ray task's) is built with
    assert path == "bucket/runs/a" and settings["retry_time_limit"] == datetime.timedelta(seconds=GCS_RETRY_S)
    assert GCS_RETRY_S <= 30  # an unreachable gs:// run directory printed nothing for 15 minutes


def test_a_uris_path_keeps_every_character_of_a_listed_file_name():
    from raypath.sources import filesystem_for

    # joined onto its directory's URI after a listing: "#" and "?" are part of the name
    name = "bkt/c/v1/train/part#2?.jsonl"
    assert filesystem_for(f"s3://{name}", "http://127.0.0.1:9")[1] == name
    assert filesystem_for("s3://bkt/c/", "http://127.0.0.1:9")[1] == "bkt/c"
    # the filesystem's own root, not the URI's netloc: Azure paths start at the container
    assert filesystem_for("abfs://cont@acct.dfs.core.windows.net/a/b")[1] == "cont/a/b"


def test_unvalidated_utf8_in_an_arrow_string_column_is_a_named_problem(tmp_path):
    # Arrow writers need not validate strings; reading them back must not crash the validation task.
    schema = pa.schema([("text", pa.string())])
    bad = tmp_path / "bad.arrow"
    with pa.OSFile(str(bad), "wb") as f, pa.ipc.new_stream(f, schema) as w:
        w.write_batch(pa.record_batch([pa.array([b"caf\xe9"], pa.binary()).view(pa.string())], schema=schema))
    assert "text is not valid UTF-8" in inspect_file(str(bad), "text")["problem"]


def test_document_text_never_becomes_a_special_token(tmp_path, tokenizer_dir, monkeypatch):
    """A document quoting "<|endoftext|>" must not put an EOS (a fake document boundary) mid-document."""
    from raypath.data import TokenizePack
    from raypath.tokenizer import load_tokenizer

    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # TokenizePack sets it; restored after the test
    doc = 'print("<|endoftext|>")  # pad: <|pad|>'
    path = tmp_path / "quotes.jsonl"
    _write_jsonl(path, [doc, "plain"])
    tok = load_tokenizer(tokenizer_dir)
    pack = TokenizePack(tokenizer_dir, "text", 16, tok.eos_token_id, 0, None, pafs.LocalFileSystem(), LOCAL)
    ids = pack._ids(Chunk(str(path), "jsonl"), {})
    assert not {tok.eos_token_id, tok.pad_token_id} & {i for doc_ids in ids for i in doc_ids}
    assert tok.decode(ids[0]) == doc


def test_too_long_document_is_an_error_or_a_counted_skip(ray_cluster, tmp_path, tokenizer_dir):
    corpus = _corpus(tmp_path / "corpus", n_versions=1)
    _write_jsonl(corpus / "v1" / "train" / "part-9.jsonl", ["x" * 5000, "short doc " + TEXT[1]])
    with pytest.raises(DataError, match=r"part-9.jsonl.*line 1.*5000 characters"):
        prepare_versions(discover_versions(corpus), _spec(tmp_path / "e", tokenizer_dir, max_doc_chars=4000))
    recs = prepare_versions(discover_versions(corpus),
                            _spec(tmp_path / "s", tokenizer_dir, max_doc_chars=4000, on_bad_input="skip"))
    assert recs[0]["skipped_docs"] == {"too_long": 1}
    assert recs[0]["docs"] == 10 + 1  # 10 train docs of v1 + the short one


def test_version_with_too_few_tokens_is_rejected(ray_cluster, tmp_path, tokenizer_dir):
    corpus = _corpus(tmp_path / "corpus", n_versions=1, docs_per_version=3)
    with pytest.raises(DataError, match="v1: .* fewer than two global batches"):
        prepare_versions(discover_versions(corpus), _spec(tmp_path, tokenizer_dir, min_blocks=10_000))


def test_empty_val_split_is_rejected(tmp_path):
    corpus = _corpus(tmp_path / "corpus", n_versions=1)
    shutil.rmtree(corpus / "v1" / "val")
    with pytest.raises(DataError, match="v1.*val"):
        discover_versions(corpus)


# ---------------------------------------------------------------- exact resume, elastic

def test_ddp_evaluates_a_split_with_fewer_blocks_than_workers(tiny_run, tmp_path):
    """One val block, two DDP workers: the rank without a block used to skip the DDP wrapper's
    buffer broadcast and hang both ranks at the next collective."""
    import dataclasses
    import threading

    from raypath.data import _write_blocks, read_blocks
    from raypath.segment import fit_segment
    from raypath.mainpath import main_segment
    from raypath.run import prepare

    cfg, _ = tiny_run
    ctx = dataclasses.replace(prepare(cfg), rd=RunDir(tmp_path), tracking=None)
    seg = main_segment(ctx, 0, None)
    one = tmp_path / "one-block.parquet"
    _write_blocks(one, read_blocks(seg.val_paths["v1"])[:1])
    short = dataclasses.replace(seg, end_step=seg.start_step + 4, save_steps=(seg.start_step + 4,),
                                val_paths={"v1": str(one)}, test_paths={},
                                train=dataclasses.replace(seg.train, eval_every=2))
    assert short.train.num_workers == 2 and short.train.parallel == "ddp"
    run = threading.Thread(target=fit_segment, args=(short,), daemon=True)
    run.start()
    run.join(timeout=600)  # a regression hangs: fail instead of blocking CI
    assert not run.is_alive(), "the segment hung in evaluation"
    curve = [r for r in map(json.loads, Path(short.curves_path).read_text().splitlines()) if "val/v1" in r]
    assert [r["step"] for r in curve] == [seg.start_step + 2, seg.start_step + 4]


def test_a_segments_dataset_is_exactly_the_rows_its_resume_point_has_not_trained(ray_cluster, tmp_path):
    """What every (re)start of a segment reads: the stream's rows below the limit, minus those
    its newest checkpoint consumed. A version's main segment starts from the previous
    version's boundary, whose rows are another stream's; a branch forks from its own
    version's main path and skips what that trained; a segment's own checkpoint wins."""
    import dataclasses

    from raypath import checkpoint as ckpt
    from raypath.config import ModelConfig, TrainConfig
    from raypath.data import _write_blocks
    from raypath.segment import Segment, resume_point, train_dataset
    from raypath.schedules import MainPath

    stream = tmp_path / "v2-stream.parquet"
    _write_blocks(stream, np.arange(40 * 4, dtype=np.int32).reshape(40, 4))

    def checkpoint(path: Path, step: int, version: str, consumed: list) -> str:
        ckpt.save(path / ckpt.step_dir_name(step), {}, {}, {"step": step, "version": version, "consumed": consumed})
        return str(path / ckpt.step_dir_name(step))

    def rows(seg: Segment) -> list[int]:
        return sorted(int(i) for b in train_dataset(seg).iter_batches(batch_format="numpy") for i in b["idx"])

    v1_end = checkpoint(tmp_path / "main-v1", 10, "v1", [[0, 40]])
    main = Segment(name="main-v2", kind="main", version="v2", stream_path=str(stream), start_step=10, end_step=19,
                   schedule=MainPath(1e-3, 0), model=ModelConfig(), train=TrainConfig(), vocab_size=64, eos_id=0,
                   pad_id=None, seq_len=4, storage=str(tmp_path / "main-v2"), curves_path="",
                   init_checkpoint=v1_end, stream_limit=36)
    assert resume_point(main) == (v1_end, {"step": 10, "version": "v1", "consumed": []})
    assert rows(main) == list(range(36))  # the last 4 rows make no whole global batch
    fork = checkpoint(tmp_path / "main-v2", 15, "v2", [[0, 8], [12, 20]])  # 2 workers' rows, one behind
    assert resume_point(main)[0] == fork
    assert rows(main) == [*range(8, 12), *range(20, 36)]
    branch = dataclasses.replace(main, name="branch-v2", kind="branch", storage=str(tmp_path / "branch-v2"),
                                 init_checkpoint=fork)
    assert rows(branch) == [*range(8, 12), *range(20, 36)]
    checkpoint(tmp_path / "branch-v2", 17, "v2", [[0, 28]])
    assert rows(branch) == list(range(28, 36))


def test_exact_resume_with_a_different_world_size(tiny_run, tmp_path):
    """Train half of v1 on 2 workers, finish it on 1: same rows as an uninterrupted run, none twice."""
    import dataclasses

    from raypath import checkpoint as ckpt
    from raypath.segment import fit_segment
    from raypath.mainpath import main_segment
    from raypath.report import read_curve
    from raypath.run import prepare

    cfg, lin = tiny_run
    # Reuse the prepared data; write (checkpoints, curves, TensorBoard events) elsewhere.
    ctx = dataclasses.replace(prepare(cfg), rd=RunDir(tmp_path), tracking=None)
    seg = main_segment(ctx, 0, None)
    assert seg.train.num_workers == 2
    half = min(seg.save_steps)
    fit_segment(dataclasses.replace(seg, end_step=half))
    one_worker = dataclasses.replace(seg, train=dataclasses.replace(seg.train, num_workers=1))
    fit_segment(one_worker)

    G = cfg.train.global_batch_size
    resumed = ckpt.load_state(Path(seg.storage) / ckpt.step_dir_name(seg.end_step))
    straight = ckpt.load_state(lin["main_path"][0]["checkpoints"]["end"])
    rows = (seg.end_step - seg.start_step) * G
    assert Consumed.from_list(resumed["consumed"]).intervals == [[0, rows]]
    assert Consumed.from_list(straight["consumed"]).intervals == [[0, rows]]
    assert resumed["tokens"] == straight["tokens"] == rows * cfg.data.seq_len
    curve = read_curve(seg.curves_path)
    assert curve["step"].is_monotonic_increasing and curve["step"].max() == seg.end_step


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.6])
def test_replay_variant_remixes_only_the_rows_left_to_train(tmp_path, ratio):
    """A sweep trial's replay ratio: same row ids and length, ``ratio`` of the rows still to
    train come from older versions (swapped both ways), trained and cut rows untouched."""
    from raypath.data import _write_blocks, replay_variant

    rng = np.random.default_rng(0)
    old = rng.integers(0, 50, (40, 5)).astype(np.int32)          # v1 blocks: tokens < 50
    new = rng.integers(100, 150, (60, 5)).astype(np.int32)       # v2 blocks: tokens >= 100
    stream_src = np.array([1] * 48 + [0] * 12)                   # v2's stream: 20% replay
    stream = new.copy()
    stream[stream_src == 0] = old[:12]
    _write_blocks(tmp_path / "v1.parquet", old)
    _write_blocks(tmp_path / "v2-new.parquet", new)
    _write_blocks(tmp_path / "v2-stream.parquet", stream, stream_src)
    version = {"name": "v2", "index": 1, "stream_path": str(tmp_path / "v2-stream.parquet"),
               "new_path": str(tmp_path / "v2-new.parquet"), "new_blocks": 60}
    older = [{"name": "v1", "index": 0, "new_path": str(tmp_path / "v1.parquet"), "new_blocks": 40}]
    consumed, limit = [[0, 20]], 56                               # fork after 20 rows; 4 rows never trained
    out = tmp_path / "variant.parquet"
    mix = replay_variant(version, older, consumed, limit, ratio, 0, out)

    assert mix["rows"] == 36 and mix["replay_rows"] == round(ratio * 36)
    table = pq.read_table(out)
    assert table["idx"].to_numpy().tolist() == list(range(60))
    tokens, src = read_blocks(out), table["src"].to_numpy()
    keep = np.r_[0:20, 56:60]
    assert np.array_equal(tokens[keep], stream[keep]) and np.array_equal(src[keep], stream_src[keep])
    todo = np.arange(20, 56)
    assert ((tokens[todo] < 50).all(axis=1) == (src[todo] == 0)).all()  # replay rows are v1 blocks
    assert ((tokens[todo] >= 100).all(axis=1) == (src[todo] == 1)).all()
    again = replay_variant(version, older, consumed, limit, ratio, 0, out)
    assert again == mix  # written once, read back


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.6, 0.95])
def test_replay_variant_never_trains_a_block_twice_in_a_branch(tmp_path, ratio, caplog):
    """A realistic stream (every own block once, replay drawn as preparation draws it): the
    swapped-in blocks are ones the branch does not hold; too few of them stop the ratio short."""
    from raypath.data import _REPLAY, Pool, Replay, _part, _write_blocks, replay_variant
    from raypath.shuffle import salt

    rng = np.random.default_rng(1)
    old, new = rng.integers(0, 50, (40, 6)).astype(np.int32), rng.integers(100, 150, (60, 6)).astype(np.int32)
    drawn = Replay.of([Pool(0, ("v1",), (40,))], 12, salt(0, _REPLAY, 1)).perm(np.arange(12))
    order = rng.permutation(72)
    stream, stream_src = np.concatenate([new, old[drawn]])[order], np.r_[[1] * 60, [0] * 12][order]
    _write_blocks(tmp_path / "v1.parquet", old)
    for i, (a, b) in enumerate([(0, 25), (25, 50), (50, 72)]):  # a stream in parts, as prepared
        _write_blocks(Path(_part(str(tmp_path / "v2-stream"), i)), stream[a:b], stream_src[a:b], np.arange(a, b))
    version = {"name": "v2", "index": 1, "stream_path": str(tmp_path / "v2-stream"), "replay_blocks": 12}
    older = [{"name": "v1", "index": 0, "new_path": str(tmp_path / "v1.parquet"), "new_blocks": 40}]
    mix = replay_variant(version, older, [[0, 30]], 72, ratio, 0, tmp_path / "variant")
    branch = read_blocks(tmp_path / "variant")[30:]
    assert len({row.tobytes() for row in branch}) == len(branch) == mix["rows"] == 42
    # Part by part: the same rows in the same files; the first part (all before the fork) copied as it is.
    parts = sorted((tmp_path / "variant").glob("part-*.parquet"))
    assert [p.name for p in parts] == [p.name for p in sorted((tmp_path / "v2-stream").glob("part-*.parquet"))]
    assert [pq.read_table(p)["idx"].to_pylist() for p in parts] == [list(range(0, 25)), list(range(25, 50)),
                                                                    list(range(50, 72))]
    assert parts[0].read_bytes() == (tmp_path / "v2-stream" / parts[0].name).read_bytes()
    if ratio == 0.95:  # 28 older blocks were never drawn: the branch takes them all, and says so
        assert mix["replay_rows"] < round(0.95 * 42) and "stops short" in caplog.text
    else:
        assert mix["replay_rows"] == round(ratio * 42)


def test_replay_variant_of_the_first_version_is_an_error(tmp_path):
    from raypath.data import _write_blocks, replay_variant

    _write_blocks(tmp_path / "s.parquet", np.zeros((8, 3), np.int32), np.zeros(8))
    v1 = {"name": "v1", "index": 0, "stream_path": str(tmp_path / "s.parquet"), "new_path": ""}
    with pytest.raises(DataError, match="v1 has no older version"):
        replay_variant(v1, [], [], 8, 0.2, 0, tmp_path / "o.parquet")
