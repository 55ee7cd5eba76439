"""The operators of the integer reference (:mod:`xnnq.export.reference`) on exact integer tensors.

A :class:`QTensor` holds ``num · 2^exp / den`` exactly: ``num`` int64, ``exp`` an int (or, after a
layer with per-channel weight scales, an int64 array broadcastable against ``num``), ``den`` a
positive odd int (a power of 2 in a divisor is moved into ``exp``). Every operator below is exact on
that representation (integer products and sums, shifts to a common exponent, windows, gathers), so
the only rounding in a graph happens where a ``QuantizeLinear`` (or, under TIDL's rounding, a linear
``Resize``) asks for it, with :func:`xnnq.layers.rounding.round_div`.

Matrix products run in float32 BLAS on chunks of the reduction short enough that every partial sum
is an integer below ``2^24`` (float32 holds those exactly, so each chunk's result is the exact
integer), and the chunks are added in int64 (:func:`exact_matmul`); everything else is int64.
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass, replace
from fractions import Fraction

import numpy as np

from ..layers.rounding import Rounding, Site, round_div

EXACT_F32 = 2**24
INT64_SAFE = 2**62


class IntegerReferenceError(ValueError):
    """A graph the integer reference cannot execute exactly (names the node and what to change)."""


@dataclass
class QTensor:
    """The exact value ``num · 2^exp / den``."""

    num: np.ndarray
    exp: int | np.ndarray = 0
    den: int = 1
    site: Site | None = None  # where its QuantizeLinear rounds (None: a requantization); see resize()

    @property
    def shape(self) -> tuple[int, ...]:
        return self.num.shape

    def value(self) -> np.ndarray:
        """float64 value (exact while ``|num| < 2^53`` and ``den`` is 1)."""
        return np.ldexp(self.num.astype(np.float64), np.asarray(self.exp, dtype=np.int64)) / self.den

    def with_num(self, num: np.ndarray) -> QTensor:
        return replace(self, num=num)


# ------------------------------------------------------------------------------------ helpers
def _check_range(num: np.ndarray, where: str) -> np.ndarray:
    """``num``, refusing values of 2^62 and beyond (used where a product can grow)."""
    if num.size and int(np.abs(num).max()) >= INT64_SAFE:
        raise IntegerReferenceError(
            f"{where}: an intermediate value exceeds 2^62; the graph's scales are too far apart "
            "for exact int64 arithmetic"
        )
    return num


def _shl(num: np.ndarray, bits: np.ndarray | int, where: str = "") -> np.ndarray:
    """``num · 2^bits`` (bits >= 0), refusing a result beyond 2^62."""
    bits = np.asarray(bits, dtype=np.int64)
    if not bits.any():
        return num
    top = int(bits.max())
    if num.size and int(np.abs(num).max()) >= INT64_SAFE >> top:
        raise IntegerReferenceError(
            f"{where}: an intermediate value exceeds 2^62 after aligning scales {top} bits apart; "
            "the graph's scales are too far apart for exact int64 arithmetic"
        )
    return np.left_shift(num, bits)


def _odd_den(num: np.ndarray, exp, den: int) -> tuple[np.ndarray, object, int]:
    """Move the powers of 2 of ``den`` into ``exp``."""
    while den > 1 and den % 2 == 0:
        den //= 2
        exp = exp - 1
    return num, exp, den


def scalar_exp(t: QTensor, where: str = "") -> QTensor:
    """``t`` with a single exponent (a per-channel exponent array is brought to its minimum)."""
    if np.ndim(t.exp) == 0:
        return QTensor(t.num, int(t.exp), t.den)
    e = int(np.min(t.exp))
    return QTensor(_shl(t.num, np.asarray(t.exp) - e, where), e, t.den)


def common(ts: list[QTensor], where: str) -> tuple[list[np.ndarray], int, int]:
    """Numerators of ``ts`` on one grid: a shared scalar exponent and a shared denominator."""
    ts = [scalar_exp(t, where) for t in ts]
    e = min(int(t.exp) for t in ts)
    den = 1
    for t in ts:
        den = den * t.den // math.gcd(den, t.den)
    nums = [_shl(t.num * (den // t.den), int(t.exp) - e, where) for t in ts]
    return nums, e, den


def represent(t: QTensor, value: float, where: str) -> tuple[QTensor, int]:
    """``(t', k)`` with ``t'`` equal to ``t`` and ``value == k · 2^t'.exp / t'.den`` exactly (``value`` a
    finite float; ``t'`` may use a finer exponent)."""
    t = scalar_exp(t, where)
    p, q = float(value).as_integer_ratio()  # q is a power of 2
    e_v = -(q.bit_length() - 1)
    e = min(int(t.exp), e_v)
    num = _shl(t.num, int(t.exp) - e, where)
    k = p * t.den * (1 << (e_v - e))  # value * den / 2^e
    return QTensor(num, e, t.den), k


def requantize(
    t: QTensor, exp_out: int, qmin: int, qmax: int, mode: Rounding | str, site: Site | str, where: str = ""
) -> np.ndarray:
    """Codes of ``t`` on the grid ``2^exp_out``: rounded under ``mode`` at ``site`` and saturated to
    ``[qmin, qmax]``."""
    d = np.asarray(t.exp, dtype=np.int64) - exp_out
    num = _shl(t.num, np.maximum(d, 0), where)
    den = np.left_shift(np.int64(t.den), np.maximum(-d, 0))
    if np.all(den == 1):
        codes = num
    else:
        codes = round_div(num, den, mode, site)
    return np.clip(codes, qmin, qmax)


def exact_matmul(
    a: np.ndarray, b: np.ndarray, where: str = "", amax: int | None = None, bmax: int | None = None
) -> np.ndarray:
    """``a @ b`` of integer-valued arrays, exactly, as int64.

    The reduction is split into chunks short enough that every partial sum of a chunk is an integer
    below ``2^24`` (float32 holds those exactly, whatever the summation order or FMA use of the BLAS);
    the chunks are summed in int64. Falls back to int64 ``matmul`` when one product alone is too large.
    ``amax``/``bmax``: known bounds on ``|a|``/``|b|`` (save a pass over a large operand).
    """
    k = a.shape[-1]
    if a.size == 0 or b.size == 0 or k == 0:
        return np.zeros(a.shape[:-1] + b.shape[-1:], dtype=np.int64)
    amax = int(np.abs(a).max()) if amax is None else amax
    bmax = int(np.abs(b).max()) if bmax is None else bmax
    prod = max(amax * bmax, 1)
    chunk = (EXACT_F32 - 1) // prod
    if chunk < 1:
        if k * prod >= INT64_SAFE:
            raise IntegerReferenceError(f"{where}: the accumulator may exceed 2^62 (bound {k * prod:.3g})")
        return np.matmul(a.astype(np.int64), b.astype(np.int64))
    a32 = a if a.dtype == np.float32 else a.astype(np.float32)
    b32 = b if b.dtype == np.float32 else b.astype(np.float32)
    out = None
    for k0 in range(0, k, chunk):
        part = np.matmul(a32[..., k0 : k0 + chunk], b32[..., k0 : k0 + chunk, :]).astype(np.int64)
        out = part if out is None else out + part
    return out


def check_accumulator(acc: np.ndarray, xmax: int, wmax: int, where: str) -> None:
    """Warn when an 8-bit layer's accumulator leaves int32 (TIDL accumulates 8-bit operands in 32 bits,
    16-bit ones in 64 bits; docs/README_tidl.md): TIDL's result would differ from the exact one here."""
    if xmax < 256 and wmax < 256 and acc.size and (int(acc.max()) >= 2**31 or int(acc.min()) < -(2**31)):
        warnings.warn(
            f"{where}: the accumulator leaves the int32 range TIDL uses for 8-bit operands; the "
            "integer reference keeps the exact value",
            stacklevel=3,
        )


def _ints(values, n: int, default: int) -> list[int]:
    return [int(v) for v in values] if values is not None and len(values) else [default] * n


# -------------------------------------------------------------------------------------- windows
def windows(
    x: np.ndarray, kernel: list[int], strides: list[int], dilations: list[int], out_shape: list[int]
) -> np.ndarray:
    """A read-only view ``(N, C, *out, *kernel)`` of the (already padded) NC... array ``x``."""
    sp = x.strides[2:]
    shape = x.shape[:2] + tuple(out_shape) + tuple(kernel)
    strides = (
        x.strides[:2]
        + tuple(s * st for s, st in zip(sp, strides))
        + tuple(s * d for s, d in zip(sp, dilations))
    )
    return np.lib.stride_tricks.as_strided(x, shape, strides, writeable=False)


def pool_geometry(shape: tuple[int, ...], attrs: dict, where: str) -> tuple[list, list, list, list, list]:
    """(kernel, strides, dilations, pads (begin+end), out spatial shape) of a Conv/pool node."""
    n = len(shape) - 2
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise IntegerReferenceError(f"{where}: auto_pad is not supported; export with explicit pads")
    kernel = [int(k) for k in attrs["kernel_shape"]]
    strides = _ints(attrs.get("strides"), n, 1)
    dil = _ints(attrs.get("dilations"), n, 1)
    pads = _ints(attrs.get("pads"), 2 * n, 0)
    ceil = int(attrs.get("ceil_mode", 0))
    out = []
    for i in range(n):
        span = shape[2 + i] + pads[i] + pads[n + i] - dil[i] * (kernel[i] - 1) - 1
        o = (-(-span // strides[i]) if ceil else span // strides[i]) + 1
        if ceil and (o - 1) * strides[i] >= shape[2 + i] + pads[i]:  # the last window must start inside
            o -= 1
        out.append(o)
    return kernel, strides, dil, pads, out


def _pad_for(
    x: np.ndarray, pads: list[int], out: list[int], kernel, strides, dil, value, dtype=None
) -> np.ndarray:
    """``x`` padded by ``pads`` (and at the end as far as the last window reaches), as ``dtype``."""
    n = x.ndim - 2
    widths = [(0, 0), (0, 0)]
    for i in range(n):
        need = (out[i] - 1) * strides[i] + dil[i] * (kernel[i] - 1) + 1
        end = max(need - x.shape[2 + i] - pads[i], 0)
        widths.append((pads[i], end))
    shape = tuple(s + b + e for s, (b, e) in zip(x.shape, widths))
    xp = np.full(shape, value, dtype=dtype or x.dtype)
    xp[tuple(slice(b, b + s) for s, (b, _) in zip(x.shape, widths))] = x
    return xp


# ---------------------------------------------------------------------------------------- conv
def conv(x: QTensor, w: QTensor, b: QTensor | None, attrs: dict, where: str) -> QTensor:
    """Conv (1-D/2-D, grouped, depthwise, dilated) with an exact int64 accumulator."""
    if x.den != 1 or np.ndim(x.exp):
        x = scalar_exp(x, where)
        if x.den != 1:
            raise IntegerReferenceError(
                f"{where}: the Conv input is not on an integer grid; quantize it first"
            )
    xn, wn = x.num, w.num
    attrs = dict(attrs, kernel_shape=attrs.get("kernel_shape") or list(wn.shape[2:]))
    kernel, strides, dil, pads, out = pool_geometry(xn.shape, attrs, where)
    groups = int(attrs.get("group", 1))
    n_batch, c_in = xn.shape[:2]
    c_out, c_g = wn.shape[:2]
    if c_g * groups != c_in:
        raise IntegerReferenceError(
            f"{where}: weight has {c_g} input channels per group, input has {c_in} for {groups} groups"
        )
    xmax = int(np.abs(xn).max()) if xn.size else 0
    # integers below 2^24 are exact in float32 (and the im2col copies are half the size of int64 ones)
    xp = _pad_for(xn, pads, out, kernel, strides, dil, 0, np.float32 if xmax < EXACT_F32 else np.int64)
    nsp = len(out)
    o_g = c_out // groups
    taps = list(itertools.product(*[range(k) for k in kernel]))

    def tap(i: tuple[int, ...], xs: np.ndarray) -> np.ndarray:  # the input samples a kernel tap reads
        return xs[
            (slice(None), slice(None))
            + tuple(slice(t * d, t * d + s * (o - 1) + 1, s) for t, d, s, o in zip(i, dil, strides, out))
        ]

    if c_g == 1 and o_g == 1:  # depthwise: one filter per channel
        wk = wn.reshape(c_out, -1)
        acc = np.zeros((n_batch, c_out, *out), dtype=np.int64)
        for j, i in enumerate(taps):
            acc += tap(i, xp).astype(np.int64) * wk[:, j].reshape((1, c_out) + (1,) * nsp)
    else:
        # im2col as (taps, C, N, *out): one slice copy per kernel tap, then weights (O, taps*C) @ cols
        xt = xp.swapaxes(0, 1)
        wmax = int(np.abs(wn).max()) if wn.size else 0
        parts = []
        for g in range(groups):
            cols = np.empty((len(taps), c_g, n_batch, *out), dtype=xp.dtype)
            for j, i in enumerate(taps):
                cols[j] = tap(i, xt[g * c_g : (g + 1) * c_g])
            wg = np.moveaxis(wn[g * o_g : (g + 1) * o_g].reshape(o_g, c_g, -1), 2, 1).reshape(o_g, -1)
            parts.append(exact_matmul(wg, cols.reshape(len(taps) * c_g, -1), where, wmax, xmax))
        acc = np.concatenate(parts, axis=0) if groups > 1 else parts[0]
        acc = acc.reshape((c_out, n_batch, *out)).swapaxes(0, 1)
    e_w = channel_exp(w, 0, where)
    exp = x.exp + e_w.reshape((1, c_out) + (1,) * nsp) if e_w.ndim else x.exp + int(e_w)
    y = QTensor(np.ascontiguousarray(acc), exp, w.den)
    if b is not None:
        e_b = channel_exp(b, 0, where)
        b_t = QTensor(
            b.num.reshape((1, c_out) + (1,) * nsp),
            e_b.reshape((1, c_out) + (1,) * nsp) if e_b.ndim else int(e_b),
            b.den,
        )
        if b_t.den == y.den and np.array_equal(
            np.broadcast_to(b_t.exp, (1, c_out) + (1,) * nsp), np.broadcast_to(y.exp, (1, c_out) + (1,) * nsp)
        ):
            y.num += b_t.num  # the bias on the accumulator's grid (the usual case): in place
        else:
            y = add(y, b_t, where)
    check_accumulator(y.num, xmax, int(np.abs(wn).max()) if wn.size else 0, where)
    return y


def conv_transpose(x: QTensor, w: QTensor, b: QTensor | None, attrs: dict, where: str) -> QTensor:
    """ConvTranspose (group 1) as the Conv it equals: the input with ``stride − 1`` zeros between samples, padded
    by ``dilation·(kernel − 1) − pads`` (plus ``output_padding`` at the end; cropped where that is negative),
    convolved at stride 1 with the kernel flipped and its in/out axes swapped. Exact like :func:`conv`."""
    if int(attrs.get("group", 1)) != 1:
        raise IntegerReferenceError(
            f"{where}: ConvTranspose with group > 1 is not supported (TIDL takes group 1)"
        )
    if attrs.get("output_shape") or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise IntegerReferenceError(
            f"{where}: ConvTranspose with output_shape or auto_pad is not supported; export explicit pads"
        )
    if x.den != 1 or np.ndim(x.exp):
        x = scalar_exp(x, where)
    xn, wn = x.num, w.num
    n = xn.ndim - 2
    kernel = [int(k) for k in (attrs.get("kernel_shape") or wn.shape[2:])]
    strides, dil = _ints(attrs.get("strides"), n, 1), _ints(attrs.get("dilations"), n, 1)
    pads, extra = _ints(attrs.get("pads"), 2 * n, 0), _ints(attrs.get("output_padding"), n, 0)
    up = np.zeros(xn.shape[:2] + tuple((h - 1) * s + 1 for h, s in zip(xn.shape[2:], strides)), xn.dtype)
    up[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)] = xn
    crop, conv_pads = [slice(None), slice(None)], [0] * (2 * n)
    for i in range(n):
        begin = dil[i] * (kernel[i] - 1) - pads[i]
        end = dil[i] * (kernel[i] - 1) - pads[n + i] + extra[i]
        crop.append(slice(max(-begin, 0), up.shape[2 + i] - max(-end, 0)))
        conv_pads[i], conv_pads[n + i] = max(begin, 0), max(end, 0)
    e = channel_exp(w, 1, where)  # one exponent per output channel (axis 1 of [in, out, ...])
    flipped = np.ascontiguousarray(np.flip(np.swapaxes(wn, 0, 1), axis=tuple(range(2, 2 + n))))
    w_conv = QTensor(flipped, e.reshape((-1,) + (1,) * (n + 1)) if e.ndim else int(e), w.den)
    attrs_conv = {"kernel_shape": kernel, "strides": [1] * n, "dilations": dil, "pads": conv_pads, "group": 1}
    return conv(replace(x, num=np.ascontiguousarray(up[tuple(crop)])), w_conv, b, attrs_conv, where)


def channel_exp(t: QTensor, axis: int, where: str = "") -> np.ndarray:
    """The exponent of ``t`` as one value per index of ``axis`` (0-d when ``t`` has a single exponent)."""
    e = np.asarray(t.exp, dtype=np.int64)
    if e.ndim == 0:
        return e
    eb = np.moveaxis(np.broadcast_to(e, t.num.shape), axis, 0).reshape(t.num.shape[axis], -1)
    if (eb != eb[:, :1]).any():
        raise IntegerReferenceError(f"{where}: a weight scale varies along an axis the layer sums over")
    return eb[:, 0].copy()


def gemm(a: QTensor, b: QTensor, c: QTensor | None, attrs: dict, where: str) -> QTensor:
    """Gemm / MatMul: ``A·B (+C)`` with an exact int64 accumulator (alpha = beta = 1)."""
    if float(attrs.get("alpha", 1.0)) != 1.0 or float(attrs.get("beta", 1.0)) != 1.0:
        raise IntegerReferenceError(f"{where}: Gemm with alpha/beta != 1 is not supported")
    a = scalar_exp(a, where)
    an = np.swapaxes(a.num, -1, -2) if attrs.get("transA") else a.num
    trans_b = bool(attrs.get("transB"))
    b_t = (
        QTensor(
            np.swapaxes(b.num, -1, -2),
            np.swapaxes(np.broadcast_to(b.exp, b.num.shape), -1, -2) if np.ndim(b.exp) else b.exp,
            b.den,
        )
        if trans_b
        else b
    )
    e_col = channel_exp(b_t, b_t.num.ndim - 1, where)  # one exponent per output column
    acc = exact_matmul(an, b_t.num, where)
    y = QTensor(acc, int(a.exp) + e_col if e_col.ndim else int(a.exp) + int(e_col), a.den * b.den)
    y = add(y, c, where) if c is not None else y
    if an.size and b_t.num.size:
        check_accumulator(y.num, int(np.abs(an).max()), int(np.abs(b_t.num).max()), where)
    return y


# --------------------------------------------------------------------------------- elementwise
def add(a: QTensor, b: QTensor, where: str, sign: int = 1) -> QTensor:
    """``a + b`` (``sign`` -1: ``a - b``) on the finer of the two grids (numpy broadcasting)."""
    if a.den != b.den:
        (na, nb), e, den = common([a, b], where)
        return QTensor(na + sign * nb, e, den)
    scalar = np.ndim(a.exp) == 0 and np.ndim(b.exp) == 0
    e = min(int(a.exp), int(b.exp)) if scalar else np.minimum(a.exp, b.exp)
    na = _shl(a.num, np.asarray(a.exp) - e, where)
    nb = _shl(b.num, np.asarray(b.exp) - e, where)
    if na is not a.num and na.shape == np.broadcast_shapes(na.shape, nb.shape):
        na += nb if sign == 1 else -nb
        return QTensor(na, e, a.den)
    return QTensor(na + sign * nb, e, a.den)


def mul(a: QTensor, b: QTensor, where: str) -> QTensor:
    a, b = scalar_exp(a, where), scalar_exp(b, where)
    num = a.num * b.num
    return QTensor(_check_range(num, where), int(a.exp) + int(b.exp), a.den * b.den)


def concat(ts: list[QTensor], axis: int, where: str) -> QTensor:
    nums, e, den = common(ts, where)
    return QTensor(np.concatenate(nums, axis=axis), e, den)


def clip(t: QTensor, lo: float | None, hi: float | None, where: str) -> QTensor:
    """``clamp(t, lo, hi)`` exactly (bounds brought onto the tensor's grid, which may get finer)."""
    for bound, fn in ((lo, np.maximum), (hi, np.minimum)):
        if bound is None or not np.isfinite(bound):
            continue
        t, k = represent(t, bound, where)
        t = t.with_num(fn(t.num, k))
    return t


# -------------------------------------------------------------------------------------- pooling
def max_pool(t: QTensor, attrs: dict, where: str) -> QTensor:
    t = scalar_exp(t, where)
    kernel, strides, dil, pads, out = pool_geometry(t.shape, attrs, where)
    low = np.iinfo(np.int64).min // 4
    xp = _pad_for(t.num, pads, out, kernel, strides, dil, low)
    win = windows(xp, kernel, strides, dil, out)
    return t.with_num(win.max(axis=tuple(range(-len(kernel), 0))))


def avg_pool(t: QTensor, attrs: dict, where: str) -> QTensor:
    """AveragePool: the exact window sum divided by the window count (``den`` grows by the count)."""
    t = scalar_exp(t, where)
    kernel, strides, dil, pads, out = pool_geometry(t.shape, attrs, where)
    axes = tuple(range(-len(kernel), 0))
    win = windows(_pad_for(t.num, pads, out, kernel, strides, dil, 0), kernel, strides, dil, out)
    sums = win.sum(axis=axes)
    if int(attrs.get("count_include_pad", 0)):
        # the window is counted over the explicit pads (not over ceil-mode overhang)
        ones = np.ones((1, 1) + t.shape[2:], dtype=np.int64)
        ones = np.pad(
            ones,
            [(0, 0), (0, 0)] + [(p, p2) for p, p2 in zip(pads[: len(kernel)], pads[len(kernel) :])],
            constant_values=1,
        )
        pads0 = [0] * (2 * len(kernel))
        counts = windows(_pad_for(ones, pads0, out, kernel, strides, dil, 0), kernel, strides, dil, out).sum(
            axis=axes
        )
    else:
        ones = np.ones((1, 1) + t.shape[2:], dtype=np.int64)
        counts = windows(_pad_for(ones, pads, out, kernel, strides, dil, 0), kernel, strides, dil, out).sum(
            axis=axes
        )
    return divide_counts(t, sums, counts)


def divide_counts(t: QTensor, sums: np.ndarray, counts: np.ndarray) -> QTensor:
    """``sums / counts`` exactly: one common denominator (the lcm of the counts)."""
    uniq = np.unique(counts)
    lcm = 1
    for c in uniq.tolist():
        lcm = lcm * int(c) // math.gcd(lcm, int(c))
    num = sums * (lcm // counts) if uniq.size > 1 else sums
    num, exp, den = _odd_den(num, t.exp, t.den * lcm)
    return QTensor(num, exp, den)


def reduce_mean(t: QTensor, axes: list[int], keepdims: bool) -> QTensor:
    t = scalar_exp(t)
    axes = tuple(a % t.num.ndim for a in axes) if axes else tuple(range(t.num.ndim))
    sums = t.num.sum(axis=axes, keepdims=keepdims)
    count = int(np.prod([t.shape[a] for a in axes]))
    return divide_counts(t, sums, np.full((1,), count))


# --------------------------------------------------------------------------------------- resize
def _source(o: int, scale: Fraction, n_in: int, n_out: int, mode: str) -> Fraction:
    if mode in ("half_pixel", "pytorch_half_pixel"):
        if mode == "pytorch_half_pixel" and n_out <= 1:
            return Fraction(0)
        return (Fraction(o) + Fraction(1, 2)) / scale - Fraction(1, 2)
    if mode == "asymmetric":
        return Fraction(o) / scale
    if mode == "align_corners":
        return Fraction(0) if n_out <= 1 else Fraction(o * (n_in - 1), n_out - 1)
    if mode == "tf_half_pixel_for_nn":
        return (Fraction(o) + Fraction(1, 2)) / scale
    raise IntegerReferenceError(f"Resize: coordinate_transformation_mode {mode!r} is not supported")


def _nearest(x: Fraction, mode: str) -> int:
    fl = math.floor(x)
    frac = x - fl
    if mode == "floor":
        return fl
    if mode == "ceil":
        return math.ceil(x)
    if frac == Fraction(1, 2):
        return fl + 1 if mode == "round_prefer_ceil" else fl
    return fl + (1 if frac > Fraction(1, 2) else 0)


def resize(t: QTensor, scales: list[Fraction], out_shape: list[int], attrs: dict, where: str) -> QTensor:
    """Resize (nearest or linear on the axes with a scale != 1) with exact interpolation weights.

    A linear resize is marked with the ``resize`` rounding site: its QuantizeLinear rounds as TIDL's
    integer bilinear kernel does under ``tidl`` rounding (floor), once, on that QuantizeLinear's grid
    (TIDL keeps the input's scale; the two grids are the same when the exported quantizer after the
    resize has its input's range).
    """
    t = scalar_exp(t, where)

    def text(v):
        return v.decode() if isinstance(v, bytes) else v

    mode = text(attrs.get("mode", b"nearest"))
    ctm = text(attrs.get("coordinate_transformation_mode", b"half_pixel"))
    nearest_mode = text(attrs.get("nearest_mode", b"round_prefer_floor"))
    if int(attrs.get("antialias", 0)) or int(attrs.get("exclude_outside", 0)):
        raise IntegerReferenceError(f"{where}: antialias / exclude_outside are not supported")
    num = t.num
    den_total = 1
    for axis, (scale, n_out) in enumerate(zip(scales, out_shape)):
        n_in = num.shape[axis]
        if n_out == n_in and scale == 1:
            continue
        src = [_source(o, scale, n_in, n_out, ctm) for o in range(n_out)]
        if mode == "nearest":
            idx = np.array([min(max(_nearest(s, nearest_mode), 0), n_in - 1) for s in src])
            num = np.take(num, idx, axis=axis)
        elif mode == "linear":
            src = [min(max(s, Fraction(0)), Fraction(n_in - 1)) for s in src]
            lo = [math.floor(s) for s in src]
            fr = [s - f for s, f in zip(src, lo)]
            d = 1
            for f in fr:
                d = d * f.denominator // math.gcd(d, f.denominator)
            w1 = np.array([int(f * d) for f in fr], dtype=np.int64)
            i0 = np.array(lo)
            i1 = np.minimum(i0 + 1, n_in - 1)
            shape = [1] * num.ndim
            shape[axis] = n_out
            num = np.take(num, i0, axis=axis) * (d - w1).reshape(shape) + np.take(
                num, i1, axis=axis
            ) * w1.reshape(shape)
            den_total *= d
        else:
            raise IntegerReferenceError(f"{where}: Resize mode {mode!r} is not supported (nearest, linear)")
    num, exp, den = _odd_den(_check_range(num, where), t.exp, t.den * den_total)
    return QTensor(num, exp, den, Site.RESIZE if mode == "linear" else None)


def argmax(t: QTensor, axis: int, keepdims: bool, select_last: bool) -> np.ndarray:
    t = scalar_exp(t)
    num = t.num
    if select_last:
        flipped = np.flip(num, axis=axis)
        idx = num.shape[axis] - 1 - np.argmax(flipped, axis=axis)
    else:
        idx = np.argmax(num, axis=axis)
    return np.expand_dims(idx, axis) if keepdims else idx
