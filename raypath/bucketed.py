"""Bucketed files: one task's rows grouped by bucket, of which many tasks each read a run of buckets.

The stream shuffle's map files (a bucket a stream shard), dedup's hash files (a bucket a
1/65,536 of hash space) and its per-task drop files (a bucket a train chunk group) are written by
one task each and read by many, each a run of consecutive buckets. A file holds each bucket's
bytes in bucket order, then an index of ``buckets + 1`` little-endian int64 byte offsets (last,
so that no bucket's bytes wait in memory while it is written): a reader of buckets
``first..last`` reads ``last - first + 2`` index entries, then the bytes of a window of buckets
in one ranged read, nothing else (no footer, no row-group padding).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

#: Most buckets one reading task takes (a run of consecutive ones): each file's index entries for
#: all of them come in one read (and, on an object store, one open).
BUCKETS_PER_TASK = 16


def write_index(f, sizes: np.ndarray) -> None:
    """After a file's buckets, in bucket order (``sizes``: each bucket's bytes, 0 where none):
    their byte offsets."""
    f.write(np.concatenate([[0], np.cumsum(sizes)]).astype("<i8").tobytes())


def write_rows(fs: pafs.FileSystem, path: str, rows: np.ndarray, counts: np.ndarray) -> None:
    """Fixed-width rows (a structured array) in bucket order, ``counts[b]`` of them bucket b's, to
    a bucketed file, complete-or-absent."""
    from raypath.data import _landing

    with _landing(fs, path) as target, fs.open_output_stream(target) as f:
        f.write(pa.py_buffer(np.ascontiguousarray(rows).view(np.uint8)))
        write_index(f, np.asarray(counts, np.int64) * rows.dtype.itemsize)


def runs(buckets: list[int], cpus: int, most: int = BUCKETS_PER_TASK) -> list[dict]:
    """Consecutive runs of ``buckets`` (those with rows), one per reading task: up to ``most``
    each, but never so few tasks that a CPU of the cluster has fewer than two."""
    per_task = max(1, min(most, len(buckets) // max(2 * cpus, 1)))
    return [{"first": buckets[k], "last": buckets[min(k + per_task, len(buckets)) - 1]}
            for k in range(0, len(buckets), per_task)]


class BucketedFiles:
    """A reading task's view of bucketed files for its run of consecutive buckets ``first..last``.

    On an object store every open is a HEAD request and a handle holds no descriptor, so each
    file is opened once for the whole run; on a local disk an open costs no request but holds a
    descriptor, so a file is reopened per read rather than thousands kept open. Reads go 16 at a
    time: on an object store each is a round trip."""

    def __init__(self, fs: pafs.FileSystem, paths: list[str], first: int, last: int, buckets: int):
        self.fs, self.paths, self.first = fs, paths, first
        self.keep = fs.type_name in ("s3", "gcs")
        got = self._each(lambda i: self._index(paths[i], first, last, buckets))
        self.handles = [h for h, _ in got]
        self.offsets = np.stack([o for _, o in got]) if got else np.zeros((0, last - first + 2), np.int64)
        self.window, self.bufs = (first, first - 1), []

    def _each(self, fn) -> list:
        with ThreadPoolExecutor(16) as pool:
            return list(pool.map(fn, range(len(self.paths))))

    def _index(self, path: str, first: int, last: int, buckets: int):
        f = self.fs.open_input_file(path)
        offsets = np.frombuffer(f.read_at(8 * (last - first + 2), f.size() - 8 * (buckets + 1 - first)), "<i8")
        if not self.keep:
            f.close()
        return (f if self.keep else None), offsets

    def windows(self, budget: int, edges: list[int] | None = None, extra: np.ndarray | None = None
                ) -> list[tuple[int, int]]:
        """The run cut into windows of consecutive buckets ``(lo, hi)``, each read at once: as many
        units as hold up to ``budget`` bytes in all the files (and ``extra`` bytes a unit, held
        beside them), at least one. A unit is a bucket, or with ``edges`` (ascending, from
        ``first`` to ``last + 1``) the buckets from one edge to the next."""
        edges = list(range(self.first, self.first + self.offsets.shape[1])) if edges is None else edges
        cols = np.asarray(edges) - self.first
        per_unit = (self.offsets[:, cols[1:]] - self.offsets[:, cols[:-1]]).sum(axis=0)
        per_unit = per_unit if extra is None else per_unit + np.asarray(extra, np.int64)
        out, lo, held = [], edges[0], 0
        for k, n in enumerate(per_unit.tolist()):
            if edges[k] > lo and held + n > budget:
                out.append((lo, edges[k] - 1))
                lo, held = edges[k], 0
            held += n
        return [*out, (lo, edges[-1] - 1)]

    def read(self, lo: int, hi: int) -> None:
        """Buckets ``lo..hi`` of every file: one ranged read per file that has bytes there."""
        self.bufs = []  # the previous window's, before this one's arrive
        self.bufs = self._each(lambda i: self._read(i, *self._span(i, lo, hi)))
        self.window = (lo, hi)

    def _span(self, i: int, lo: int, hi: int) -> tuple[int, int]:
        return int(self.offsets[i, lo - self.first]), int(self.offsets[i, hi + 1 - self.first])

    def _read(self, i: int, start: int, end: int) -> pa.Buffer | None:
        if end <= start:
            return None
        if self.keep:
            return pa.py_buffer(self.handles[i].read_at(end - start, start))
        with self.fs.open_input_file(self.paths[i]) as f:
            return pa.py_buffer(f.read_at(end - start, start))

    def piece(self, i: int, lo: int, hi: int | None = None) -> pa.Buffer | None:
        """File ``i``'s bytes of buckets ``lo..hi`` (default: bucket ``lo``), from the window read
        last; None where it has none."""
        hi = lo if hi is None else hi
        assert self.window[0] <= lo <= hi <= self.window[1], (lo, hi, self.window)
        (start, end), base = self._span(i, lo, hi), self._span(i, *self.window)[0]
        return self.bufs[i].slice(start - base, end - start) if end > start else None

    def rows(self, lo: int, hi: int, dtype: np.dtype) -> np.ndarray:
        """Buckets ``lo..hi`` of every file, as fixed-width rows (:func:`write_rows`), in file order:
        from the window read last where it holds them, else read now."""
        if not self.window[0] <= lo <= hi <= self.window[1]:
            self.read(lo, hi)
        pieces = [np.frombuffer(p, dtype) for i in range(len(self.paths)) if (p := self.piece(i, lo, hi)) is not None]
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype)

    def close(self) -> None:
        for h in self.handles:
            if h is not None:
                h.close()
