"""GGUF block encodings of a weight that sits on a learned integer grid.

Every function takes a row-major weight `w` [rows, cols] with, per element, its grid step
`s`, zero point `z` and integer code `c` (so that w == s * (c - z)), and returns the GGUF
bytes [rows, bytes per row] plus a boolean mask of the blocks that reproduce the grid
exactly (the codes, and the step up to the format's fp16 storage of scales). Blocks that
cannot hold the grid are re-quantized from `w` by a simple nearest-grid search.

Block layouts follow ggml (ggml-common.h); `gguf.quants.dequantize` decodes them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

QK = 32  # block length of Q4_1 and Q8_0
QK_K = 256  # super-block length of the k-quants
SUB = 16  # sub-block length of Q2_K and Q3_K


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    """[..., 1] float -> [..., 2] uint8 (little-endian fp16)."""
    return np.ascontiguousarray(x.astype(np.float16)).view(np.uint8)


def _constant(a: np.ndarray) -> np.ndarray:
    """Per block (last axis): whether all entries are equal."""
    return (a == a[..., :1]).all(axis=-1)


def _pack_k_low2(q: np.ndarray) -> np.ndarray:
    """2-bit values [n, 256] -> qs [n, 64] in the Q2_K/Q3_K order (element 128h + 32j + l
    goes to byte 32h + l, bits 2j)."""
    q = q.astype(np.uint8).reshape(-1, 2, 4, 32)
    out = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
    return out.reshape(-1, 64)


def encode_q4_1(w: np.ndarray, s: np.ndarray, z: np.ndarray, c: np.ndarray):
    """Q4_1 (blocks of 32: y = d*q + m, q in 0..15). Exact where a block has one step and
    zero and its codes are 4-bit."""
    rows, cols = w.shape
    n = rows * cols // QK
    sb, zb, cb = (a.reshape(n, QK) for a in (s, z, c))
    exact = _constant(sb) & _constant(zb) & (cb >= 0).all(-1) & (cb <= 15).all(-1)
    d = sb[:, :1]
    m = -sb[:, :1] * zb[:, :1]
    q = np.clip(cb, 0, 15).astype(np.uint8)
    qs = q[:, :16] | (q[:, 16:] << 4)
    ours = np.concatenate([_f16_bytes(d), _f16_bytes(m), qs], axis=1)
    return _select(ours, lambda x: quants.quantize(x, T.Q4_1), w, exact, rows), exact


def encode_q8_0(w: np.ndarray, s: np.ndarray, z: np.ndarray, c: np.ndarray):
    """Q8_0 (blocks of 32: y = d*q, q in -128..127). Symmetric: exact where a block has
    one step and zero and its codes minus the zero (or their negation) fit in int8."""
    rows, cols = w.shape
    n = rows * cols // QK
    sb, zb, cb = (a.reshape(n, QK) for a in (s, z, c))
    v = cb - zb
    fits_pos = (v >= -128).all(-1) & (v <= 127).all(-1)
    fits_neg = (-v >= -128).all(-1) & (-v <= 127).all(-1)
    exact = _constant(sb) & _constant(zb) & (fits_pos | fits_neg)
    sign = np.where(fits_pos, 1.0, -1.0)[:, None]
    d = sb[:, :1] * sign
    q = np.clip(v * sign, -128, 127).astype(np.int8).view(np.uint8)
    ours = np.concatenate([_f16_bytes(d), q], axis=1)
    return _select(ours, lambda x: quants.quantize(x, T.Q8_0), w, exact, rows), exact


def encode_q2_k(w: np.ndarray, s: np.ndarray, z: np.ndarray, c: np.ndarray):
    """Q2_K (super-blocks of 256, sub-blocks of 16: y = d*sc*q - dmin*m, q in 0..3, sc and
    m 4-bit). Exact where a super-block has one step, 2-bit codes and per-sub-block zeros
    of one sign with |zero| <= 15 (sc = 1, d = step, dmin = ±step, m = |zero|)."""
    rows, cols = w.shape
    n = rows * cols // QK_K
    sb, zb, cb = (a.reshape(n, QK_K) for a in (s, z, c))
    zsub = zb.reshape(n, SUB, SUB)
    sign = np.where((zb >= 0).all(-1), 1.0, -1.0)
    exact = (_constant(sb) & _constant(zsub).all(-1) & (cb >= 0).all(-1) & (cb <= 3).all(-1)
             & ((zb >= 0).all(-1) | (zb <= 0).all(-1)) & (np.abs(zb) <= 15).all(-1))
    m = np.clip(np.abs(zsub[:, :, 0]), 0, 15).astype(np.uint8)
    scales = np.uint8(1) | (m << 4)
    qs = _pack_k_low2(np.clip(cb, 0, 3))
    d = sb[:, :1]
    ours = np.concatenate([scales, qs, _f16_bytes(d), _f16_bytes(d * sign[:, None])], axis=1)
    ssub = sb.reshape(n, SUB, SUB)

    def requantize(x: np.ndarray) -> np.ndarray:
        grid_aware = _quantize_q2_k(x, ssub[~exact, :, 0], (ssub * zsub)[~exact, :, 0])
        return _closest(x, T.Q2_K, grid_aware, _quantize_q2_k(x))

    return _select(ours, requantize, w, exact, rows), exact


def encode_q3_k(w: np.ndarray, s: np.ndarray, z: np.ndarray, c: np.ndarray):
    """Q3_K (super-blocks of 256, sub-blocks of 16: y = d*sc*(u-4), u in 0..7, sc signed
    6-bit). Symmetric: a sub-block is exact where its codes minus its zero (or their
    negation) lie in -4..3 (sc = ±1, d = step). Where a super-block has one step the other
    sub-blocks keep that step times the best integer sc (the nearest coarser grid); where
    it does not, the super-block is re-quantized from `w`."""
    rows, cols = w.shape
    n = rows * cols // QK_K
    sb, zb, cb = (a.reshape(n, QK_K) for a in (s, z, c))
    one_step = _constant(sb)
    v = (cb - zb).reshape(n, SUB, SUB)
    best_err = np.full((n, SUB), np.inf)
    best_sc = np.ones((n, SUB))
    best_u = np.zeros((n, SUB, SUB))
    for k in range(1, 32):
        for sc in (k, -k):
            u = np.clip(np.rint(v / sc), -4, 3)
            err = ((v - sc * u) ** 2).sum(-1)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_sc = np.where(better, sc, best_sc)
            best_u = np.where(better[..., None], u, best_u)
    exact_sub = best_err == 0
    exact = one_step & exact_sub.all(-1)
    ours = _pack_q3_k(sb[:, :1], best_sc, best_u + 4)

    def requantize(x: np.ndarray) -> np.ndarray:
        return _closest(x, T.Q3_K, ours[~exact], _quantize_q3_k(x))

    return _select(ours, requantize, w, exact, rows), exact


def _closest(x: np.ndarray, qtype: T, *candidates: np.ndarray) -> np.ndarray:
    """Per block, the candidate encoding whose decoded values are nearest to `x`."""
    errors = [((quants.dequantize(e, qtype) - x) ** 2).sum(-1) for e in candidates]
    best = np.argmin(np.stack(errors), axis=0)
    return np.choose(best[:, None], candidates)


def _select(ours: np.ndarray, requantize: Callable[[np.ndarray], np.ndarray], w: np.ndarray,
            exact: np.ndarray, rows: int) -> np.ndarray:
    """Our encoding where it is exact; `requantize` applied to the other blocks of `w`."""
    out = ours.copy()
    if not exact.all():
        out[~exact] = requantize(w.reshape(exact.size, -1)[~exact])
    return out.reshape(rows, -1)


def _pack_q3_k(d: np.ndarray, sc: np.ndarray, u: np.ndarray) -> np.ndarray:
    """d [n, 1], sc [n, 16] integers in -32..31, u [n, 16, 16] integers in 0..7."""
    n = d.shape[0]
    u = u.reshape(n, QK_K).astype(np.uint8)
    hbit = (u >> 2).reshape(n, 8, 32)
    hmask = np.zeros((n, 32), dtype=np.uint8)
    for i in range(8):
        hmask |= hbit[:, i] << i
    qs = _pack_k_low2(u & 3)
    q6 = (sc + 32).astype(np.uint8)
    low = (q6[:, :8] & 15) | ((q6[:, 8:] & 15) << 4)
    high = np.zeros((n, 4), dtype=np.uint8)
    for t in range(4):
        high |= ((q6[:, 4 * t:4 * t + 4] >> 4) & 3) << (2 * t)
    return np.concatenate([hmask, qs, low, high, _f16_bytes(d)], axis=1)


def _quantize_q3_k(x: np.ndarray) -> np.ndarray:
    """Q3_K from floats [n, 256]: per sub-block the signed scale with the least squared
    error among a few candidates, then 6-bit scales under one fp16 super-scale."""
    n = x.shape[0]
    xs = x.reshape(n, SUB, SUB).astype(np.float64)
    amax_at = np.abs(xs).argmax(-1)
    peak = np.take_along_axis(xs, amax_at[..., None], -1)[..., 0]
    best_err = np.full((n, SUB), np.inf)
    best_scale = np.zeros((n, SUB))
    for f in np.linspace(3.0, 4.5, 7):
        scale = -peak / f  # the peak maps to -f grid steps, using the longer side (-4)
        safe = np.where(scale == 0, 1.0, scale)
        u = np.clip(np.rint(xs / safe[..., None]), -4, 3)
        err = ((xs - scale[..., None] * u) ** 2).sum(-1)
        better = err < best_err
        best_err, best_scale = np.where(better, err, best_err), np.where(better, scale,
                                                                          best_scale)
    d = np.abs(best_scale).max(-1, keepdims=True) / 31
    d16 = d.astype(np.float16).astype(np.float64)
    safe_d = np.where(d16 == 0, 1.0, d16)
    sc = np.clip(np.rint(best_scale / safe_d), -32, 31)
    eff = d16 * sc
    safe_eff = np.where(eff == 0, 1.0, eff)
    u = np.where(eff[..., None] == 0, 0, np.clip(np.rint(xs / safe_eff[..., None]), -4, 3))
    return _pack_q3_k(d16, sc, u + 4)


def _quantize_q2_k(x: np.ndarray, a: np.ndarray | None = None,
                   b: np.ndarray | None = None) -> np.ndarray:
    """Q2_K from floats [n, 256]: per sub-block the step `a` and offset `b` (y = a*q - b;
    default: the sub-block's min/max grid, min clipped to <= 0), rounded to 4-bit scales
    and mins under two fp16 super-scales; then the codes are re-rounded."""
    n = x.shape[0]
    xs = x.reshape(n, SUB, SUB).astype(np.float64)
    if a is None or b is None:
        lo = np.minimum(xs.min(-1), 0.0)
        a, b = (xs.max(-1) - lo) / 3, -lo
    b = np.maximum(b, 0.0)
    d = (a.max(-1, keepdims=True) / 15).astype(np.float16).astype(np.float64)
    dmin = (b.max(-1, keepdims=True) / 15).astype(np.float16).astype(np.float64)
    sc = np.clip(np.rint(a / np.where(d == 0, 1.0, d)), 0, 15)
    m = np.clip(np.rint(b / np.where(dmin == 0, 1.0, dmin)), 0, 15)
    step = d * sc
    q = np.clip(np.rint((xs + (dmin * m)[..., None]) / np.where(step == 0, 1.0, step)[..., None]),
                0, 3)
    q = np.where(step[..., None] == 0, 0, q)
    scales = sc.astype(np.uint8) | (m.astype(np.uint8) << 4)
    return np.concatenate([scales, _pack_k_low2(q.reshape(n, QK_K)), _f16_bytes(d),
                           _f16_bytes(dmin)], axis=1)


ENCODERS = {T.Q4_1: encode_q4_1, T.Q8_0: encode_q8_0, T.Q2_K: encode_q2_k, T.Q3_K: encode_q3_k}
