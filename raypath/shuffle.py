"""Seeded randomness that needs no state: hash keys and a keyed permutation, both vectorised.

Preparing a version shuffles and samples rows of corpora that do not fit one
process. Anything that draws from a random generator in order would tie the
result to the order rows happen to arrive in (which depends on the number of
actors and the scheduling). These functions map a row's stable identity to its
random choice instead, so every process computes the same answer for the same
row, in any order:

* :func:`hash64` -- a 64-bit key per row: sorting by it is a seeded global shuffle;
* :class:`Permutation` -- a keyed bijection of ``[0, n)`` (a Feistel network with
  cycle-walking): ``Permutation(n, key).inverse(q) < m`` selects exactly ``m`` of
  ``n`` rows, uniformly and without replacement, from the row's position ``q`` alone.
"""

from __future__ import annotations

import numpy as np

_U = np.uint64


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective, well-mixing map of uint64 (wraps mod 2**64)."""
    x = np.asarray(x, dtype=np.uint64).copy()
    with np.errstate(over="ignore"):
        x ^= x >> _U(30)
        x *= _U(0xBF58476D1CE4E5B9)
        x ^= x >> _U(27)
        x *= _U(0x94D049BB133111EB)
        x ^= x >> _U(31)
    return x


def salt(*parts: int) -> int:
    """One 64-bit key from a few integers (seed, purpose, version ...)."""
    h = np.zeros(1, np.uint64)
    for p in parts:
        with np.errstate(over="ignore"):
            h = mix64(h ^ np.asarray([int(p) & 0xFFFFFFFFFFFFFFFF], np.uint64))
    return int(h[0])


def hash64(key: int, *columns: np.ndarray) -> np.ndarray:
    """Per-row 64-bit hash of integer ``columns`` under ``key``."""
    h = np.full(len(columns[0]), key, np.uint64)
    for c in columns:
        h = mix64(h ^ np.asarray(c).astype(np.int64).view(np.uint64))
    return h


def bucket_of(keys: np.ndarray, buckets: int) -> np.ndarray:
    """Range bucket of uniform 64-bit keys: bucket order = key order (a range-partitioned sort)."""
    return ((np.asarray(keys, np.uint64) >> _U(32)) * _U(buckets) >> _U(32)).astype(np.int64)


class Permutation:
    """A keyed bijection of ``[0, n)``: 4 Feistel rounds on ``2**(2h) >= n``, cycle-walked into range.

    O(1) state, vectorised, and invertible, so both "the i-th chosen row" and "is row q
    chosen" are a few hash evaluations.
    """

    ROUNDS = 4

    def __init__(self, n: int, key: int):
        if n < 1:
            raise ValueError(f"permutation of {n} elements")
        self.n = int(n)
        self.half = max(1, (int(n - 1).bit_length() + 1) // 2)
        self.mask = _U((1 << self.half) - 1)
        self.keys = [salt(key, r) for r in range(self.ROUNDS)]

    def _f(self, r: np.ndarray, i: int) -> np.ndarray:
        return mix64(r ^ _U(self.keys[i])) & self.mask

    def _forward(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> _U(self.half), x & self.mask
        for i in range(self.ROUNDS):
            left, right = right, left ^ self._f(right, i)
        return (left << _U(self.half)) | right

    def _backward(self, y: np.ndarray) -> np.ndarray:
        left, right = y >> _U(self.half), y & self.mask
        for i in reversed(range(self.ROUNDS)):
            left, right = right ^ self._f(left, i), left
        return (left << _U(self.half)) | right

    def _walk(self, x: np.ndarray, step) -> np.ndarray:
        # The Feistel domain is at most 4n: each walk step lands in range with p >= 1/4.
        y = step(np.asarray(x, np.uint64))
        out = y >= _U(self.n)
        while out.any():
            y[out] = step(y[out])
            out = y >= _U(self.n)
        return y.astype(np.int64)

    def __call__(self, i: np.ndarray) -> np.ndarray:
        """The element at permuted position ``i``."""
        return self._walk(i, self._forward)

    def inverse(self, q: np.ndarray) -> np.ndarray:
        """The position of element ``q``."""
        return self._walk(q, self._backward)
