"""llama.cpp's K-quant blocks, written in numpy: gguf-py reads K-quants but cannot write them, and building
llama.cpp to run `llama-quantize` is the step that breaks most often in other tools' GGUF exports.

Each function follows llama.cpp's reference quantizer (ggml-quants.c, `quantize_row_*_ref`, what `llama-quantize`
runs without an importance matrix) operation for operation in float32, vectorised over blocks instead of looping
over them, so the bytes equal llama.cpp's own (tests/unit/test_kquants.py compares them with llama.cpp's library).
Sums run element by element in llama.cpp's order (`cumsum`, which accumulates left to right; numpy's pairwise
`sum` would round differently).

Q6_K: super-blocks of 256 values in 16 groups of 16; each group has a 6-bit quant per value and an 8-bit scale, the
super-block one fp16 scale. 210 bytes: ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16], d.
Q4_K / Q5_K: super-blocks of 256 in 8 groups of 32, each group a 6-bit scale and a 6-bit min (value = d*sc*q -
dmin*m), the super-block fp16 d and dmin. Q4_K: 144 bytes (d, dmin, scales[12], qs[128]); Q5_K: 176 bytes (d, dmin,
scales[12], qh[32] with each value's fifth bit, qs[128]).
"""

from __future__ import annotations

import numpy as np

QK_K = 256
BLOCK_BYTES = {"q4_k": 144, "q5_k": 176, "q6_k": 210}
GROUP_MAX_EPS = np.float32(1e-15)
CHUNK_BLOCKS = 4096  # super-blocks per vectorised pass: ~1M values, a few MB of temporaries


def quantize(data: np.ndarray, kind: str) -> np.ndarray:
    """`kind` ("q4_k", "q5_k", "q6_k") blocks of a float array whose rows are a multiple of 256 wide, as
    (..., row bytes) uint8: what gguf's writer takes with raw_dtype."""
    rows = np.ascontiguousarray(data, dtype=np.float32).reshape(-1, data.shape[-1])
    if rows.shape[-1] % QK_K:
        raise ValueError(f"{kind.upper()} needs rows that are a multiple of {QK_K} wide, got {rows.shape[-1]}")
    encode = {"q4_k": _q4_k_blocks, "q5_k": _q5_k_blocks, "q6_k": _q6_k_blocks}[kind]
    blocks = rows.reshape(-1, QK_K)
    out = np.empty((len(blocks), BLOCK_BYTES[kind]), dtype=np.uint8)
    for start in range(0, len(blocks), CHUNK_BLOCKS):
        out[start:start + CHUNK_BLOCKS] = encode(blocks[start:start + CHUNK_BLOCKS])
    return out.reshape(*data.shape[:-1], -1)


def _nearest_int(values: np.ndarray) -> np.ndarray:
    # llama.cpp adds 1.5 * 2^23 and reads the mantissa: round half to even, as rint does (|values| < 2^22 here).
    return np.rint(values).astype(np.int32)


def _sequential_sum(terms: np.ndarray) -> np.ndarray:
    """Row sums accumulated left to right in float32, as a C loop `s += t[i]` from s = 0 does (the + 0 gives the
    C loop's +0.0 where every term is a zero)."""
    return np.cumsum(terms, axis=1, dtype=np.float32)[:, -1] + np.float32(0)


def _make_qx_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """(scale per group, quants L + nmax per value) of groups x[g, i], rmse_type 1 (weights x^2), no importance."""
    groups = len(x)
    f32 = np.float32
    index = np.argmax(np.abs(x), axis=1)  # the first largest magnitude, as llama.cpp's strict `>` scan finds it
    signed_max = x[np.arange(groups), index]
    live = np.abs(signed_max) >= GROUP_MAX_EPS
    safe_max = np.where(live, signed_max, f32(1))
    weight = x * x

    def sums(iscale):
        quants = np.clip(_nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
        levels = quants.astype(f32)
        return quants, _sequential_sum(weight * x * levels), _sequential_sum(weight * levels * levels)

    iscale = f32(-nmax) / safe_max
    quants, sumlx, suml2 = sums(iscale)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / suml2, f32(0)).astype(f32)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        trial = -(f32(nmax) + f32(0.1) * f32(step)) / safe_max
        trial_quants, trial_lx, trial_l2 = sums(trial)
        better = (trial_l2 > 0) & (trial_lx * trial_lx > best * trial_l2)
        with np.errstate(divide="ignore", invalid="ignore"):
            trial_scale = (trial_lx / trial_l2).astype(f32)
        quants = np.where(better[:, None], trial_quants, quants)
        scale = np.where(better, trial_scale, scale)
        best = np.where(better, scale * trial_lx, best)
    quants = np.where(live[:, None], quants + nmax, 0)
    return np.where(live, scale, f32(0)), quants


def _q6_k_blocks(blocks: np.ndarray) -> np.ndarray:
    f32 = np.float32
    count = len(blocks)
    groups = blocks.reshape(count * 16, 16)
    scales, quants = _make_qx_quants(groups, 32)
    scales, quants = scales.reshape(count, 16), quants.reshape(count, 16, 16)
    index = np.argmax(np.abs(scales), axis=1)
    max_scale = scales[np.arange(count), index]
    live = np.abs(max_scale) >= GROUP_MAX_EPS
    iscale = f32(-128) / np.where(live, max_scale, f32(1))
    d = np.where(live, f32(1) / iscale, f32(0)).astype(np.float16)
    group_scales = np.minimum(127, _nearest_int(iscale[:, None] * scales)).astype(np.int8)
    group_scales[~live] = 0
    step = d.astype(f32)[:, None] * group_scales.astype(f32)  # per group; 0 keeps make_qx_quants' quants
    x = blocks.reshape(count, 16, 16)
    with np.errstate(divide="ignore", invalid="ignore"):
        requantized = np.clip(_nearest_int(x / step[:, :, None]), -32, 31) + 32
    levels = np.where((step != 0)[:, :, None], requantized, quants).reshape(count, 2, 4, 32).astype(np.uint8)
    levels[~live] = 0
    # Per 128-value half: ql packs values l and l+64 (and l+32, l+96) as nibbles; qh their top two bits.
    low = levels & 0xF
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
    high = levels >> 4
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    return np.concatenate([ql.reshape(count, 128), qh.reshape(count, 64), group_scales.view(np.uint8),
                           d.reshape(count, 1).view(np.uint8)], axis=1)


def _make_qkx2_quants(x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float,
                      nstep: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scale, min as a positive offset, quants 0..nmax) per group x[g, i]: llama.cpp's make_qkx2_quants (squared
    error, not mad), the asymmetric search Q4_K and Q5_K run per group of 32."""
    f32 = np.float32
    low = np.minimum(x.min(axis=1), f32(0))  # (llama.cpp's running min from x[0], then min(., 0))
    high = x.max(axis=1)
    sum_w = _sequential_sum(weights)
    sum_x = _sequential_sum(weights * x)
    flat = high == low
    span = np.where(flat, f32(1), high - low)
    iscale = f32(nmax) / span
    scale = f32(1) / iscale
    quants = np.clip(_nearest_int(iscale[:, None] * (x - low[:, None])), 0, nmax)
    diff = scale[:, None] * quants.astype(f32) + low[:, None] - x
    best_error = _sequential_sum(weights * (diff * diff))
    minimum = low
    for step in range(nstep + 1):
        # (llama.cpp's loop reads `min` after each improvement: later trials start from the better offset)
        trial = (f32(rmin) + f32(rdelta) * f32(step) + f32(nmax)) / np.where(flat, f32(1), high - minimum)
        trial_quants = np.clip(_nearest_int(trial[:, None] * (x - minimum[:, None])), 0, nmax)
        levels = trial_quants.astype(f32)
        sum_l = _sequential_sum(weights * levels)
        sum_l2 = _sequential_sum(weights * levels * levels)
        sum_xl = _sequential_sum(weights * levels * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        with np.errstate(divide="ignore", invalid="ignore"):
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            positive = this_min > 0
            this_scale = np.where(positive, sum_xl / sum_l2, this_scale).astype(f32)
        this_min = np.where(positive, f32(0), this_min).astype(f32)
        diff = this_scale[:, None] * levels + this_min[:, None] - x
        error = _sequential_sum(weights * (diff * diff))
        better = (det > 0) & (error < best_error)
        quants = np.where(better[:, None], trial_quants, quants)
        best_error = np.where(better, error, best_error)
        scale = np.where(better, this_scale, scale)
        minimum = np.where(better, this_min, minimum)
    quants = np.where(flat[:, None], 0, quants)
    return np.where(flat, f32(0), scale), -minimum, quants


def _q45_k_blocks(blocks: np.ndarray, nmax: int, rmin: float, nstep: int) -> tuple:
    """The scale/min search and requantization Q4_K and Q5_K share: (d, dmin as fp16, packed scales[12], quants)."""
    f32 = np.float32
    count = len(blocks)
    x = blocks.reshape(count * 8, 32)
    av_x = np.sqrt(_sequential_sum(x * x) / f32(32))
    weights = av_x[:, None] + np.abs(x)
    scales, mins, quants = _make_qkx2_quants(x, weights, nmax, rmin, f32(0.1), nstep)
    scales, mins, quants = scales.reshape(count, 8), mins.reshape(count, 8), quants.reshape(count, 8, 32)
    max_scale = np.maximum(scales.max(axis=1), f32(0))
    max_min = np.maximum(mins.max(axis=1), f32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, f32(63) / max_scale, f32(0)).astype(f32)
        inv_min = np.where(max_min > 0, f32(63) / max_min, f32(0)).astype(f32)
    # uint8_t ls = nearest_int(...): C keeps the low byte, then MIN(63, .)
    ls = np.minimum(_nearest_int(inv_scale[:, None] * scales) & 0xFF, 63).astype(np.uint8)
    lm = np.minimum(_nearest_int(inv_min[:, None] * mins) & 0xFF, 63).astype(np.uint8)
    packed = np.zeros((count, 12), np.uint8)
    packed[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    packed[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    d = (max_scale / f32(63)).astype(np.float16)
    dmin = (max_min / f32(63)).astype(np.float16)
    step = d.astype(f32)[:, None] * ls.astype(f32)
    offset = dmin.astype(f32)[:, None] * lm.astype(f32)
    values = blocks.reshape(count, 8, 32)
    with np.errstate(divide="ignore", invalid="ignore"):
        requantized = np.clip(_nearest_int((values + offset[:, :, None]) / step[:, :, None]), 0, nmax)
    quants = np.where((step != 0)[:, :, None], requantized, quants).astype(np.uint8)
    return d, dmin, packed, quants


def _q4_k_blocks(blocks: np.ndarray) -> np.ndarray:
    count = len(blocks)
    d, dmin, packed, quants = _q45_k_blocks(blocks, 15, -1.0, 20)
    pairs = quants.reshape(count, 4, 2, 32)  # per 64 values: value l low nibble, value l + 32 high nibble
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(count, 128)
    return np.concatenate([d.reshape(count, 1).view(np.uint8), dmin.reshape(count, 1).view(np.uint8), packed, qs],
                          axis=1)


def _q5_k_blocks(blocks: np.ndarray) -> np.ndarray:
    count = len(blocks)
    d, dmin, packed, quants = _q45_k_blocks(blocks, 31, -0.5, 15)
    pairs = quants.reshape(count, 4, 2, 32)
    low = pairs & 0xF
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(count, 128)
    high = (pairs >> 4).astype(np.uint8)  # the fifth bit: bit 2n of qh[l] for value 64n + l, bit 2n+1 for +32
    shifts = (2 * np.arange(4, dtype=np.uint8))[None, :, None]
    qh = np.bitwise_or.reduce((high[:, :, 0] << shifts) | (high[:, :, 1] << (shifts + 1)), axis=1)
    return np.concatenate([d.reshape(count, 1).view(np.uint8), dmin.reshape(count, 1).view(np.uint8), packed,
                           qh.astype(np.uint8), qs], axis=1)
