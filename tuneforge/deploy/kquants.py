"""llama.cpp's K-quant blocks, written in numpy: gguf-py reads K-quants but cannot write them, and building
llama.cpp to run `llama-quantize` is the step that breaks most often in other tools' GGUF exports.

Each function follows llama.cpp's reference quantizer (ggml-quants.c, `quantize_row_*_ref`, what `llama-quantize`
runs without an importance matrix) operation for operation in float32, vectorised over blocks instead of looping
over them, so the bytes equal llama.cpp's own (tests/unit/test_kquants.py compares them with llama.cpp's library).
Sums run element by element in llama.cpp's order (`cumsum`, which accumulates left to right; numpy's pairwise
`sum` would round differently).

Q6_K: super-blocks of 256 values in 16 groups of 16; each group has a 6-bit quant per value and an 8-bit scale, the
super-block one fp16 scale. 210 bytes: ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16], d.
"""

from __future__ import annotations

import numpy as np

QK_K = 256
Q6_K_BLOCK_BYTES = 210
GROUP_MAX_EPS = np.float32(1e-15)
CHUNK_BLOCKS = 4096  # super-blocks per vectorised pass: ~1M values, a few MB of temporaries


def quantize_q6_k(data: np.ndarray) -> np.ndarray:
    """Q6_K blocks of a float array whose rows are a multiple of 256 wide, as (rows, row bytes) uint8."""
    rows = np.ascontiguousarray(data, dtype=np.float32).reshape(-1, data.shape[-1])
    if rows.shape[-1] % QK_K:
        raise ValueError(f"Q6_K needs rows that are a multiple of {QK_K} wide, got {rows.shape[-1]}")
    blocks = rows.reshape(-1, QK_K)
    out = np.empty((len(blocks), Q6_K_BLOCK_BYTES), dtype=np.uint8)
    for start in range(0, len(blocks), CHUNK_BLOCKS):
        out[start:start + CHUNK_BLOCKS] = _q6_k_blocks(blocks[start:start + CHUNK_BLOCKS])
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
