"""Exact and near-duplicate rows, found in a stream with memory bounded by a few hundred bytes per row.

Exact: the row's text with whitespace collapsed and case folded, hashed to 64 bits; the first row of each text is kept.

Near: the Jaccard similarity of the rows' word sets (lower-cased `\\w+` words, so word order, punctuation and case
do not count; a changed word does). Four steps:
1. while streaming, a MinHash signature per row (datasketch, `NUM_PERM` permutations) is cut into `BANDS` bands of
   `ROWS_PER_BAND` values; each band's 64-bit hash is kept (16 x 8 bytes per row) and the low byte of every value
   (128 bytes), never the text;
2. rows that share a band hash are candidate pairs (LSH). With 16 bands of 8, a pair at Jaccard 0.85 becomes a
   candidate with probability 0.994 and a pair at 0.5 with 0.06, so recall is set here;
3. candidates whose b-bit MinHash estimate (from the low bytes) is far below the threshold are dropped as they are
   found. Templated data needs this: rows that share a long template collide in some band by the million on a
   million rows (the number grows with the square of the rows), far too many to check one by one;
4. the caller reads the remaining candidate rows again and `verify` computes their exact Jaccard: a pair is a
   near-duplicate only when its true similarity reaches the threshold, so MinHash noise never decides the verdict.
Pairs join into groups by connected components (scipy); the first row of a group is the one to keep.

Why not datasketch's `MinHashLSH` index itself: its in-memory storage keeps Python objects per bucket, measured at
~6 KB per row with these 16 bands (1,000,000 rows: ~6 GB); the band hashes in arrays need 128 bytes. The
banding is the same (contiguous slices of the signature), and `tests/unit/test_data_dedup.py` checks that the
candidate pairs equal `MinHashLSH(params=(16, 8)).query`'s on the same signatures.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import numpy as np

NEAR_DUP_THRESHOLD = 0.85
NUM_PERM = 128
BANDS, ROWS_PER_BAND = 16, 8
# A band bucket this large (many rows alike in one band: templated data) pairs each row with its next WINDOW rows
# instead of with all of them, so the number of candidate pairs stays linear in the number of rows.
WINDOW = 64
# Candidate pairs whose b-bit MinHash estimate is this far below the threshold are not verified (`_plausible`).
ESTIMATE_MARGIN = 0.2
_PRUNE_CHUNK = 1 << 18

_WORD = re.compile(r"\w+")
# Fixed odd multipliers that fold a band's 8 uint32 values into one 64-bit hash (wrapping arithmetic).
_BAND_MIX = np.random.default_rng(20240607).integers(1, 2**63, size=ROWS_PER_BAND, dtype=np.uint64) | np.uint64(1)


def exact_key(text: str) -> int:
    """64-bit hash of the text with whitespace runs collapsed and case folded."""
    normal = " ".join(text.split()).casefold()
    return int.from_bytes(hashlib.blake2b(normal.encode("utf-8"), digest_size=8).digest(), "little")


def word_set(text: str) -> frozenset[str]:
    """The shingles of near-duplicate detection: the row's distinct lower-cased words."""
    return frozenset(_WORD.findall(text.lower()))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


@dataclass
class DuplicateGroups:
    """Groups of row indices (each sorted, first = the row to keep) and, for near-duplicates, why each was joined."""

    exact: list[list[int]] = field(default_factory=list)
    near: list[list[int]] = field(default_factory=list)
    # near-duplicate row -> (its most similar row in the group, their Jaccard similarity)
    near_partner: dict[int, tuple[int, float]] = field(default_factory=dict)

    def dropped(self) -> dict[int, tuple[str, int, float | None]]:
        """Every row a clean keeps out: index -> ("exact" | "near", the row it duplicates, similarity or None)."""
        out: dict[int, tuple[str, int, float | None]] = {}
        for group in self.exact:
            for index in group[1:]:
                out[index] = ("exact", group[0], None)
        for group in self.near:
            for index in group[1:]:
                partner, similarity = self.near_partner[index]
                out.setdefault(index, ("near", partner, similarity))
        return out


class DuplicateFinder:
    """Feed rows in order with `add`; then `candidates()`, `verify(word_sets)` with those rows' word sets."""

    def __init__(self, threshold: float = NEAR_DUP_THRESHOLD, near: bool = True):
        from datasketch import MinHash
        import xxhash

        if not 0 < threshold <= 1:
            raise ValueError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self.near = near
        self._first_of_text: dict[int, int] = {}
        self._exact_groups: dict[int, list[int]] = {}
        self._minhash = MinHash(num_perm=NUM_PERM, hashfunc=xxhash.xxh32_intdigest)
        self._ids: list[np.ndarray] = []  # chunks of row indices that have a signature
        self._bands: list[np.ndarray] = []  # chunks of [rows, BANDS] uint64 band hashes
        self._low_bytes: list[np.ndarray] = []  # chunks of [rows, NUM_PERM] uint8: each signature value's low byte
        self._pending_ids: list[int] = []
        self._pending: list[np.ndarray] = []

    def add(self, index: int, exact_text: str, near_text: str) -> None:
        key = exact_key(exact_text)
        first = self._first_of_text.setdefault(key, index)
        if first != index:  # an exact duplicate: grouped here, and kept out of the near-duplicate index
            self._exact_groups.setdefault(first, [first]).append(index)
            return
        if not self.near:
            return
        words = _WORD.findall(near_text.lower())
        if not words:
            return
        self._minhash.clear()
        self._minhash.update_batch({w.encode("utf-8") for w in words})
        self._pending_ids.append(index)
        self._pending.append(self._minhash.hashvalues.copy())
        if len(self._pending) >= 4096:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        signatures = np.stack(self._pending).astype(np.uint64)
        bands = signatures.reshape(-1, BANDS, ROWS_PER_BAND)
        self._bands.append((bands * _BAND_MIX).sum(axis=2))  # uint64 wraps: a multiply-add hash per band
        self._low_bytes.append((signatures & np.uint64(0xFF)).astype(np.uint8))
        self._ids.append(np.asarray(self._pending_ids, dtype=np.int64))
        self._pending, self._pending_ids = [], []

    def candidates(self, prune: bool = True) -> np.ndarray:
        """Candidate near-duplicate pairs [P, 2] of row indices (i < j) from band collisions. With `prune`, pairs
        whose estimated similarity is far below the threshold are left out as they are found (see `_plausible`)."""
        self._flush()
        if not self._ids:
            return np.empty((0, 2), dtype=np.int64)
        ids = np.concatenate(self._ids)
        bands = np.concatenate(self._bands)
        low_bytes = np.concatenate(self._low_bytes) if prune else None
        found: list[np.ndarray] = []  # pairs of positions in `ids`, as first << 32 | second
        for b in range(BANDS):
            order = np.argsort(bands[:, b], kind="stable")  # stable: within a bucket, positions stay ascending
            keys = bands[order, b]
            # A bucket is a run of equal keys. Pair each member with the next 1, 2, ... WINDOW members of its run:
            # every pair of a bucket up to WINDOW + 1 rows, each row's next WINDOW rows in a larger one.
            for distance in range(1, WINDOW + 1):
                at = np.flatnonzero(keys[distance:] == keys[:-distance])
                if not len(at):
                    break  # no bucket has more than `distance` members
                first, second = order[at], order[at + distance]
                if low_bytes is not None:
                    keep = self._plausible(low_bytes, first, second)
                    first, second = first[keep], second[keep]
                found.append((first.astype(np.int64) << 32) | second.astype(np.int64))
        if not found:
            return np.empty((0, 2), dtype=np.int64)
        pairs = np.unique(np.concatenate(found))
        return np.stack([ids[pairs >> 32], ids[pairs & 0xFFFFFFFF]], axis=1)

    def _plausible(self, low_bytes: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        """Which pairs could reach the threshold, by b-bit MinHash (Li & König): the low bytes of two rows'
        signature values agree with probability J + (1 - J) / 256. Pairs estimated more than ESTIMATE_MARGIN below
        the threshold are dropped: over 6 standard deviations at 128 values, so a pair at the threshold is lost
        with a probability under 1e-9, while templated rows that merely share many words (millions of band
        collisions on a million rows) never reach the exact, per-pair check."""
        cut = max(0.0, self.threshold - ESTIMATE_MARGIN)
        need = int(np.ceil(NUM_PERM * (cut + (1 - cut) / 256)))
        keep = np.empty(len(first), dtype=bool)
        for start in range(0, len(first), _PRUNE_CHUNK):  # chunks: [chunk, 128] bytes per side stays small
            part = slice(start, start + _PRUNE_CHUNK)
            agree = (low_bytes[first[part]] == low_bytes[second[part]]).sum(axis=1)
            keep[part] = agree >= need
        return keep

    def verify(self, pairs: np.ndarray, word_sets: dict[int, frozenset[str]]) -> DuplicateGroups:
        """Keep the candidate pairs whose exact Jaccard reaches the threshold; group rows (exact and near)."""
        groups = DuplicateGroups(exact=sorted(self._exact_groups.values()))
        kept: list[tuple[int, int]] = []
        for i, j in pairs.tolist():
            similarity = jaccard(word_sets[i], word_sets[j])
            if similarity >= self.threshold:
                kept.append((i, j))
                for row, other in ((i, j), (j, i)):
                    if row not in groups.near_partner or similarity > groups.near_partner[row][1]:
                        groups.near_partner[row] = (other, similarity)
        groups.near = _connected_groups(kept)
        return groups


def _connected_groups(pairs: list[tuple[int, int]]) -> list[list[int]]:
    if not pairs:
        return []
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    nodes = np.unique(np.asarray(pairs).ravel())
    position = {int(n): k for k, n in enumerate(nodes)}
    rows = [position[i] for i, _ in pairs]
    cols = [position[j] for _, j in pairs]
    graph = coo_matrix((np.ones(len(pairs)), (rows, cols)), shape=(len(nodes), len(nodes)))
    _, labels = connected_components(graph, directed=False)
    by_label: dict[int, list[int]] = {}
    for node, label in zip(nodes.tolist(), labels.tolist()):
        by_label.setdefault(label, []).append(node)
    return sorted(sorted(group) for group in by_label.values())
