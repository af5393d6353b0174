"""Perceptual fingerprints of radiographs: the same radiograph re-encoded, resized, stored as PNG or JPEG, or re-cropped
by a pixel or two is recognised; two different radiographs are not.

The fingerprint is a DCT hash (pHash with a 16 x 16 block): the image (8-bit grayscale as prepare stores it) is
resized to a normalised 64 x 64 thumbnail (LANCZOS), transformed by an orthonormal 2-D DCT-II, and the 255 lowest
frequencies but the constant term each give one bit: above their median or not. Two images are the same radiograph
when their fingerprints differ in at most MATCH_BITS bits.

The numbers behind MATCH_BITS (bench/bench_fingerprint.py, bench/RESULTS.md): of the 5,886 pairs of 109 real
radiographs one is within 14 bits (two films of what looks like one patient in one position, 2 bits apart), the next
68 apart; re-encoding (JPEG q75..q95, PNG), halving, quartering move a fingerprint by at most 6 bits, a gamma change
by up to 16 (98% within 14); a crop of 1 px per side of a 512 px image 99% within 14, of 2 px 98%, of 3 px 73%, of
4 px 27%. Larger crops, rotations, flips and other windowing are NOT recognised. cxrdist's synthetic radiographs (one
template, few individual traits) are closer to one another: see bench/RESULTS.md.

Why not the `imagehash` package: fingerprints are computed from the pixel arrays prepare already holds, in its worker
processes, and compared in bulk as packed bit arrays; imagehash wants PIL images and compares one pair at a time.
The DCT is scipy's.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy.fft import dct

THUMBNAIL_SIDE = 64
DCT_BLOCK = 16
BITS = DCT_BLOCK * DCT_BLOCK - 1  # the constant term says only how bright the image is
WORDS = 4  # 255 bits padded to four uint64
MATCH_BITS = 14
METHOD = f"dct{DCT_BLOCK}x{DCT_BLOCK}-of-{THUMBNAIL_SIDE}px-v1"
# Bit k of a fingerprint holds frequency (k * 97) mod 255: the nearly constant lowest frequencies are spread over all
# chunks, so no chunk value is shared by most radiographs (which would make near_pairs compare nearly every pair).
ORDER = (np.arange(BITS) * 97) % BITS
CHUNK_BITS = 32
CHUNKS = WORDS * 64 // CHUNK_BITS  # MATCH_BITS < 2 * CHUNKS: within MATCH_BITS, some chunk differs in at most one bit
PAIR_BLOCK = 2_000_000  # candidate pairs compared at once


def fingerprint(pixels: np.ndarray) -> np.ndarray:
    """A 2-D uint8 image -> its fingerprint, (WORDS,) uint64."""
    thumbnail = Image.fromarray(np.ascontiguousarray(pixels)).resize((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.LANCZOS)
    spectrum = dct(dct(np.asarray(thumbnail, dtype=np.float64), axis=0, norm="ortho"), axis=1, norm="ortho")
    low = spectrum[:DCT_BLOCK, :DCT_BLOCK].ravel()[1:]
    bits = np.zeros(WORDS * 64, dtype=bool)
    bits[:BITS] = (low > np.median(low))[ORDER]
    return np.packbits(bits).view(">u8").astype(np.uint64)


def distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bits in which fingerprints differ, row by row ((N, WORDS) against (N, WORDS) or (WORDS,))."""
    return np.bitwise_count(np.bitwise_xor(a, b)).sum(axis=-1)


def near_pairs(a: np.ndarray, b: np.ndarray | None = None, max_bits: int = MATCH_BITS) -> tuple[np.ndarray, np.ndarray]:
    """(i, j): every pair with distance(a[i], b[j]) <= max_bits, sorted; with b None, the pairs i < j within a.

    Multi-index hashing: cut into 8 chunks of 32 bits; two fingerprints within 15 bits differ in at most one bit of some
    chunk, so only pairs whose chunk values are equal or one bit apart (33 probes per chunk, each a sorted search) are
    compared, in blocks, vectorised."""
    if max_bits >= 2 * CHUNKS:
        raise ValueError(f"max_bits must be below {2 * CHUNKS}")
    within = b is None
    b = a if within else b
    found = set()
    for chunk in range(CHUNKS):
        left, right = _chunk(a, chunk), _chunk(b, chunk)
        order = np.argsort(right, kind="stable")
        ordered = right[order]
        for flip in [None, *range(CHUNK_BITS)]:
            probe = left if flip is None else left ^ np.uint64(1 << flip)
            i, j = _sharing(probe, ordered, order)
            if within:
                keep = i < j
                i, j = i[keep], j[keep]
            for start in range(0, i.size, PAIR_BLOCK):
                bi, bj = i[start:start + PAIR_BLOCK], j[start:start + PAIR_BLOCK]
                close = distance(a[bi], b[bj]) <= max_bits
                found.update(zip(bi[close].tolist(), bj[close].tolist()))
    if not found:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    pairs = np.array(sorted(found), dtype=np.int64)
    return pairs[:, 0], pairs[:, 1]


def _chunk(prints: np.ndarray, chunk: int) -> np.ndarray:
    per_word = 64 // CHUNK_BITS
    word, part = divmod(chunk, per_word)
    return (prints[:, word] >> np.uint64(CHUNK_BITS * part)) & np.uint64((1 << CHUNK_BITS) - 1)


def _sharing(left: np.ndarray, ordered: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (i, j) with left[i] == right[j], `ordered` being right sorted by `order`; no Python loop."""
    start = np.searchsorted(ordered, left, side="left")
    stop = np.searchsorted(ordered, left, side="right")
    sizes = stop - start
    i = np.repeat(np.arange(left.size), sizes)
    offsets = np.arange(i.size) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    return i, order[np.repeat(start, sizes) + offsets]


def connected_groups(count: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """A group id per item, items linked by the pairs (i, j) in one group (scipy's connected components)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(i.size, dtype=np.int8), (i, j)), shape=(count, count))
    return connected_components(graph, directed=False)[1]
