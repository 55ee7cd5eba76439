"""The fused activation fake-quantization kernels for CPU tensors: a small C library built at first use.

Two loops over a float32 array in memory order (see :mod:`xnnq.layers.fused` for what they compute):

* ``xnnq_fq_forward``: ``out = round_half_even(clamp(min(x, cap) · inv, qmin, qmax)) · s`` (code 0 as +0.0)
  and, when asked, the 1-byte straight-through mask ``(x < cap) & (lo < codes < hi)``;
* ``xnnq_fq_backward``: ``mask ? grad : +0.0`` (the mask bytes are 0 or 1);
* ``xnnq_tqt_forward`` / ``xnnq_tqt_backward``: the same for a learned (TQT) threshold, per tensor, with the
  codes kept for the threshold's gradient (:mod:`xnnq.layers.tqt`);

and the statistics loops of the range tracker and of calibration (each documented at its C function): sampled
extremes, extremes, histogram counts (of a sample, with its extremes in the same call), batch sums.

Why C and not the ``torch.compile`` kernels used on GPUs: inductor's CPU code loads the 1-byte mask eight
elements at a time through a partial vector load, which made its backward several times slower than a copy of
the gradient, and each call of a compiled function costs tens of microseconds in guards and wrappers. These
loops are plain C that GCC/Clang vectorize (``-O3 -march=native``) and split over ``omp parallel for`` in
the OpenMP runtime torch already loaded (the same ``libgomp.so.1``), with torch's thread count passed in.

Build: ``$CC`` (default ``cc``) compiles the source below into a temporary directory once per process
(a fraction of a second; nothing is cached on disk, so a library built for one CPU never runs on another).
NaN propagates through the forward (a NaN input gives a NaN output; its mask byte is 0).
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import shlex
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define BLOCK 16384
#define PARALLEL_MIN 65536

/* in a loop over sampled runs (row r of rows at p, stride apart, `end` long): the run 16 rows ahead, both ends
   (it may straddle two cache lines) */
#define PREFETCH_RUN(r, rows, p, stride, end)              \
    if ((r) + 16 < (rows)) {                               \
        __builtin_prefetch((p) + 16 * (stride));           \
        __builtin_prefetch((p) + 16 * (stride) + (end) - 1); \
    }

/* A workspace of at least `bytes` for the calling thread in `slot`, kept between calls (grown, never shrunk,
   one per calling thread: concurrent calls from two threads do not share it): no allocation, and no fresh
   pages to fault in, per call. NULL when it cannot be allocated. */
static void *workspace(int slot, size_t bytes) {
    static _Thread_local void *ws[2];
    static _Thread_local size_t have[2];
    if (have[slot] < bytes) {
        free(ws[slot]);
        ws[slot] = malloc(bytes);
        have[slot] = ws[slot] ? bytes : 0;
    }
    return ws[slot];
}
#define WS_HIST 0
#define WS_ROW_SUM 1

/* one element: the code of min(x, cap) (NaN stays NaN), rounded half to even, times the scale (code 0 as
   +0.0); KEEP is the straight-through mask */
#define FQ_ELEMENT(xi, OUT, KEEP)                                    \
    {                                                                \
        float c_ = ((xi) > cap ? cap : (xi)) * inv;                  \
        float k_ = c_ < qmin ? qmin : c_;                            \
        k_ = k_ > qmax ? qmax : k_;                                  \
        float q_ = nearbyintf(k_);                                   \
        OUT = (q_ == 0.0f ? 0.0f : q_) * scale;                      \
        KEEP = (uint8_t)(((xi) < cap) & (c_ > lo) & (c_ < hi));      \
    }

#define FQ_LOOP(BODY)                                                                      \
    _Pragma("omp parallel for schedule(static) num_threads(threads) if (n > PARALLEL_MIN)") \
    for (int64_t b = 0; b < n; b += BLOCK) {                                               \
        int64_t e = b + BLOCK < n ? b + BLOCK : n;                                         \
        for (int64_t i = b; i < e; i++) BODY                                               \
    }

/* out-of-place; mask may be NULL (no gradient wanted); the scale is read from scale_p, its reciprocal taken in
   float32 (as torch's 1 / scale) */
void xnnq_fq_forward(const float *restrict x, float *restrict out, uint8_t *restrict mask, int64_t n,
                     const float *scale_p, float qmin, float qmax, float lo, float hi, float cap, int threads) {
    const float scale = *scale_p, inv = 1.0f / scale;
    if (mask) {
        FQ_LOOP({ FQ_ELEMENT(x[i], out[i], mask[i]) })
    } else {
        FQ_LOOP({ uint8_t keep; FQ_ELEMENT(x[i], out[i], keep) (void)keep; })
    }
}

/* in place: x is overwritten with its fake-quantized values */
void xnnq_fq_forward_inplace(float *restrict x, uint8_t *restrict mask, int64_t n, const float *scale_p,
                             float qmin, float qmax, float lo, float hi, float cap, int threads) {
    const float scale = *scale_p, inv = 1.0f / scale;
    if (mask) {
        FQ_LOOP({ float xi = x[i]; FQ_ELEMENT(xi, x[i], mask[i]) })
    } else {
        FQ_LOOP({ float xi = x[i]; uint8_t keep; FQ_ELEMENT(xi, x[i], keep) (void)keep; })
    }
}

/* TQT, per tensor (xnnq.layers.tqt): codes = min(x, cap) · inv (inv = 1 / s in float32, as torch's 1 / scale;
   NaN stays NaN), out = round_half_even(clamp(codes, qmin, qmax)) · s. The torch ops this replaces (clamp(max=cap),
   mul, clamp, round_, mul_) keep the sign of a zero code (-0.0 stays -0.0), and so does this loop. With a cap,
   capmask = x < cap (the gradient mask of torch's clamp(max=cap): x == cap and NaN get none). */
void xnnq_tqt_forward(const float *restrict x, float *restrict out, float *restrict codes,
                      uint8_t *restrict capmask, int64_t n, const float *scale_p, float qmin, float qmax,
                      float cap, int threads) {
    const float scale = *scale_p, inv = 1.0f / scale;
    if (capmask) {
        FQ_LOOP({
            float xi = x[i];
            float c_ = (xi > cap ? cap : xi) * inv;
            codes[i] = c_;
            capmask[i] = (uint8_t)(xi < cap);
            float k_ = c_ < qmin ? qmin : c_;
            out[i] = nearbyintf(k_ > qmax ? qmax : k_) * scale;
        })
    } else {
        FQ_LOOP({
            float c_ = x[i] * inv;
            codes[i] = c_;
            float k_ = c_ < qmin ? qmin : c_;
            out[i] = nearbyintf(k_ > qmax ? qmax : k_) * scale;
        })
    }
}

/* TQT backward, per tensor, from the saved codes c: keep = lo < c < hi (hardtanh_backward's test; a NaN code's
   gradient is +0.0, as torch's vectorized loop gives it; its scalar tail passes it); grad_x = keep ? grad : +0.0
   and, when inner is not NULL,
   inner = round_half_even(clamp(c, qmin, qmax)) - (keep ? c : +0.0), the factor of the threshold's gradient
   (q - x/s in range, qmin / qmax where clipped). capmask (or NULL: no cap) zeroes grad_x where it is 0. */
void xnnq_tqt_backward(const float *restrict grad, const float *restrict codes, const uint8_t *restrict capmask,
                       float *restrict grad_x, float *restrict inner, int64_t n, float qmin, float qmax,
                       float lo, float hi, int threads) {
    if (inner) {
        FQ_LOOP({
            float c_ = codes[i];
            int keep_ = (c_ > lo) & (c_ < hi);
            grad_x[i] = keep_ & (capmask ? capmask[i] : 1) ? grad[i] : 0.0f;
            float k_ = c_ < qmin ? qmin : c_;
            inner[i] = nearbyintf(k_ > qmax ? qmax : k_) - (keep_ ? c_ : 0.0f);
        })
    } else {
        FQ_LOOP({
            float c_ = codes[i];
            grad_x[i] = (c_ > lo) & (c_ < hi) & (capmask ? capmask[i] : 1) ? grad[i] : 0.0f;
        })
    }
}

/* grad and out as the bits of float32: mask 1 keeps every bit, mask 0 gives +0.0 (an integer AND vectorizes
   better than a float select of a byte mask) */
void xnnq_fq_backward(const uint32_t *restrict grad, const uint8_t *restrict mask, uint32_t *restrict out,
                      int64_t n, int threads) {
    FQ_LOOP({ out[i] = grad[i] & (0u - (uint32_t)mask[i]); })
}

/* The minimum and maximum of p[0..len) folded into *lo and *hi, a NaN among them into *nan (`omp simd` lets
   the compiler vectorize the reductions; the order of a min or max does not change its value). */
static inline void fold_extremes(const float *p, int64_t len, float *lo, float *hi, int *nan) {
    float bl = INFINITY, bh = -INFINITY;
    int bad = 0;
    _Pragma("omp simd reduction(min:bl) reduction(max:bh) reduction(|:bad)")
    for (int64_t i = 0; i < len; i++) {
        float v = p[i];
        bl = v < bl ? v : bl;
        bh = v > bh ? v : bh;
        bad |= v != v;
    }
    *lo = bl < *lo ? bl : *lo;
    *hi = bh > *hi ? bh : *hi;
    *nan |= bad;
}

/* The minimum (out[0]) and maximum (out[1]) of x[0..n); both NaN when x holds a NaN. */
void xnnq_minmax(const float *restrict x, int64_t n, float *out, int threads) {
    float lo = INFINITY, hi = -INFINITY;
    int nan = 0;
    _Pragma("omp parallel for schedule(static) num_threads(threads) if (n > PARALLEL_MIN) reduction(min:lo) reduction(max:hi) reduction(|:nan)")
    for (int64_t b = 0; b < n; b += BLOCK) fold_extremes(x + b, b + BLOCK < n ? BLOCK : n - b, &lo, &hi, &nan);
    out[0] = nan ? NAN : lo;
    out[1] = nan ? NAN : hi;
}

/* Histogram counts of the sample x[r*stride + i] (r < rows, i < len), each value taken as min(v, cap), on
   bins equal bins over [-span, span] (span a power of 2, mul = bins / (2 span)): the bin of v is
   (int64)((v + span) * mul) in float32, the last bin for v = span, as xnnq/calibrate/histogram.py's
   bin_index computes it. Values must lie in [-span, span] and not be NaN. */
static void hist_rows(const float *x, int64_t r0, int64_t r1, int64_t i0, int64_t i1, int64_t stride, float cap,
                      float span, float mul, int64_t bins, double *counts) {
    for (int64_t r = r0; r < r1; r++) {
        const float *p = x + r * stride;
        PREFETCH_RUN(r, r1, p, stride, i1);
        for (int64_t i = i0; i < i1; i++) {
            float v = p[i] > cap ? cap : p[i];
            int64_t j = (int64_t)((v + span) * mul);
            counts[j < bins - 1 ? j : bins - 1] += 1.0;
        }
    }
}

/* hist_rows into HIST_WAYS interleaved uint32 histograms (way = element index mod HIST_WAYS, `bins` apart): a
   stretch of values in one bin (the zeros after a ReLU) is then HIST_WAYS independent chains of increments
   instead of one chain of dependent read-modify-writes */
#define HIST_WAYS 4
static void hist_rows_ways(const float *x, int64_t r0, int64_t r1, int64_t i0, int64_t i1, int64_t stride,
                           float cap, float span, float mul, int64_t bins, uint32_t *ways) {
    for (int64_t r = r0; r < r1; r++) {
        const float *p = x + r * stride;
        PREFETCH_RUN(r, r1, p, stride, i1);
        for (int64_t i = i0; i < i1; i++) {
            float v = p[i] > cap ? cap : p[i];
            int64_t j = (int64_t)((v + span) * mul);
            ways[(i & (HIST_WAYS - 1)) * bins + (j < bins - 1 ? j : bins - 1)] += 1u;
        }
    }
}

/* Split over threads when the sample is large; each thread counts into its own HIST_WAYS uint32 histograms
   (below 2^32 values, no count overflows), all added to the double counts at the end (integer-valued, so the
   sum is exact in any order: the same counts as hist_rows). Large histograms, or no memory for the ways: one
   chain of double counts. */
void xnnq_hist_add(const float *x, int64_t rows, int64_t len, int64_t stride, float cap, float span,
                   float mul, int64_t bins, double *counts, int threads) {
    int nt = threads > 1 && rows * len >= 16384 ? threads : 1;
    uint32_t *ways = bins <= 16384 && rows * len < ((int64_t)1 << 32)
                         ? workspace(WS_HIST, (size_t)nt * HIST_WAYS * (size_t)bins * sizeof(uint32_t))
                         : NULL;
    if (!ways) {
        hist_rows(x, 0, rows, 0, len, stride, cap, span, mul, bins, counts);
        return;
    }
    int64_t used = 1; /* the team's size: only its threads' counts are zeroed and filled below */
    _Pragma("omp parallel num_threads(nt) if (nt > 1)")
    {
#ifdef _OPENMP
        int64_t id = omp_get_thread_num(), k = omp_get_num_threads();
#else
        int64_t id = 0, k = 1;
#endif
        if (id == 0) used = k;
        uint32_t *w = ways + id * HIST_WAYS * bins;
        memset(w, 0, HIST_WAYS * (size_t)bins * sizeof(uint32_t));
        if (rows >= k)
            hist_rows_ways(x, rows * id / k, rows * (id + 1) / k, 0, len, stride, cap, span, mul, bins, w);
        else /* fewer runs than threads (one long run): split along the runs */
            hist_rows_ways(x, 0, rows, len * id / k, len * (id + 1) / k, stride, cap, span, mul, bins, w);
    }
    for (int64_t t = 0; t < used * HIST_WAYS; t++)
        for (int64_t j = 0; j < bins; j++) counts[j] += (double)ways[t * bins + j];
}

/* The histogram of a sample in one call: the extremes of its values (ext = [min(lo, cap), min(hi, cap), NaN
   seen]; when both are finite also folded into *run_min and *run_max, if given), then, when no value is
   NaN and both lie within [-span, span] (span > 0), the counts of xnnq_hist_add (the sample is still in
   cache). Returns 1 when counted, 0 when the caller must grow the span (or stop at a NaN) first. Rows are
   split over threads when the sample is large. */
int xnnq_hist_sample(const float *x, int64_t rows, int64_t len, int64_t stride, float cap, float span, float mul,
                     int64_t bins, double *counts, float *ext, float *run_min, float *run_max, int threads) {
    float lo = INFINITY, hi = -INFINITY;
    int nan = 0;
    _Pragma("omp parallel for schedule(static) num_threads(threads) if (threads > 1 && rows > 1 && rows * len >= 16384) reduction(min:lo) reduction(max:hi) reduction(|:nan)")
    for (int64_t r = 0; r < rows; r++) {
        const float *p = x + r * stride;
        PREFETCH_RUN(r, rows, p, stride, len);
        fold_extremes(p, len, &lo, &hi, &nan);
    }
    lo = lo > cap ? cap : lo;
    hi = hi > cap ? cap : hi;
    ext[0] = lo;
    ext[1] = hi;
    ext[2] = (float)nan;
    if (!nan && run_min && run_max && isfinite(lo) && isfinite(hi)) {
        *run_min = lo < *run_min ? lo : *run_min;
        *run_max = hi > *run_max ? hi : *run_max;
    }
    if (nan || !(span > 0.0f) || -lo > span || hi > span) return 0;
    xnnq_hist_add(x, rows, len, stride, cap, span, mul, bins, counts, threads);
    return 1;
}

/* ATen's cascade sums (SumKernel.cpp multi_row_sum) of m contiguous columns starting at p, down `rows` rows
   row_stride apart: chunks of 2^level_power rows summed in turn into a cascade of four accumulators per
   column (acc: 4 m floats of workspace); the sum of column k is left in acc[k]. A chunk's sum,
   ((0 + row i) + row i+1) + ..., is taken in registers (16 columns a vector, then the last m % 16 one by one)
   and only then added to the second accumulator, as ATen's first accumulator (which such chunks leave at
   zero) would pass it on; rows after the last chunk go to the first accumulator. */
typedef float xnnq_v16 __attribute__((vector_size(64), aligned(4)));
static void cascade_sums(const float *p, int64_t row_stride, int64_t rows, int64_t m, float *acc) {
    int64_t ceil_log2 = 0;
    while (((int64_t)1 << ceil_log2) < rows) ceil_log2++;
    const int64_t level_power = ceil_log2 / 4 > 4 ? ceil_log2 / 4 : 4;
    const int64_t level_step = (int64_t)1 << level_power, level_mask = level_step - 1;
    const int64_t mv = m - m % 16;
    float *lv[4] = {acc, acc + m, acc + 2 * m, acc + 3 * m};
    for (int64_t k = 0; k < 4 * m; k++) acc[k] = 0.0f;
    int64_t i = 0;
    while (i + level_step <= rows) {
        for (int64_t k = 0; k < mv; k += 16) {
            xnnq_v16 s = {0};
            for (int64_t j = 0; j < level_step; j++) s += *(const xnnq_v16 *)(p + (i + j) * row_stride + k);
            *(xnnq_v16 *)(lv[1] + k) += s;
        }
        for (int64_t k = mv; k < m; k++) {
            float s = 0.0f;
            for (int64_t j = 0; j < level_step; j++) s += p[(i + j) * row_stride + k];
            lv[1][k] += s;
        }
        i += level_step;
        for (int l = 2; l < 4; l++) {
            if ((i & (level_mask << ((l - 1) * level_power))) != 0) break;
            float *lo = lv[l - 1], *hi = lv[l];
            for (int64_t k = 0; k < m; k++) { hi[k] += lo[k]; lo[k] = 0.0f; }
        }
    }
    for (; i < rows; i++) {
        const float *row = p + i * row_stride;
        for (int64_t k = 0; k < m; k++) lv[0][k] += row[k];
    }
    for (int64_t k = 0; k < m; k++) acc[k] = ((lv[0][k] + lv[1][k]) + lv[2][k]) + lv[3][k];
}

/* columns per cascade: its four accumulator rows (128 KiB) stay in a core's L2 cache */
#define ROW_SUM_TILE 8192

/* total[c] += (double) x.sum(0)[c] for x of shape (rows, cols), contiguous, c < cols, with the float32 sum in
   the order of torch's outer-dimension sum (ATen's vectorized_outer_sum with vectors of `vec` floats): the
   cascade per column for the columns its blocks of four vectors cover (all but the last cols % (4 vec)), and
   for those last ones ATen's row_sum: the column read as (rows / 4, 4), four cascades over its rows
   i = k (mod 4), the rows left over added to the first, then the four summed. *count += rows when given.
   Returns 0, or -1 when the workspace could not be allocated (nothing is done then). */
int xnnq_add_row_sum(const float *restrict x, int64_t rows, int64_t cols, int64_t vec, double *restrict total,
                     int64_t *count, int threads) {
    int64_t vcols = cols - cols % (4 * vec);
    int nt = rows * cols > PARALLEL_MIN ? threads : 1;
    /* tiles of at most ROW_SUM_TILE columns, at least one per thread (in whole cache lines): a column's
       cascade does not depend on the tile it is in, so the split changes no bit */
    int64_t tile = ROW_SUM_TILE;
    if (nt > 1 && vcols < (int64_t)nt * ROW_SUM_TILE) tile = ((vcols + nt - 1) / nt + 15) / 16 * 16;
    if (tile < 16) tile = 16;
    int64_t tiles = (vcols + tile - 1) / tile;
    float *work = workspace(WS_ROW_SUM, (size_t)nt * 4 * ROW_SUM_TILE * sizeof(float));
    if (!work) return -1;
    if (count) *count += rows;
    _Pragma("omp parallel num_threads(nt) if (nt > 1)")
    {
#ifdef _OPENMP
        float *acc = work + (int64_t)omp_get_thread_num() * 4 * ROW_SUM_TILE;
#else
        float *acc = work;
#endif
        _Pragma("omp for schedule(static)")
        for (int64_t t = 0; t < tiles; t++) {
            int64_t b = t * tile, m = vcols - b < tile ? vcols - b : tile;
            cascade_sums(x + b, cols, rows, m, acc);
            for (int64_t k = 0; k < m; k++) total[b + k] += (double)acc[k];
        }
    }
    for (int64_t c = vcols; c < cols; c++) {
        int64_t quads = rows / 4;
        float part[4], acc[4];
        for (int k = 0; k < 4; k++) {
            cascade_sums(x + (int64_t)k * cols + c, 4 * cols, quads, 1, acc);
            part[k] = acc[0];
        }
        for (int64_t i = quads * 4; i < rows; i++) part[0] += x[i * cols + c];
        total[c] += (double)(((part[0] + part[1]) + part[2]) + part[3]);
    }
    return 0;
}

/* in place: grad[i] = mask[i] ? grad[i] : +0.0 */
void xnnq_fq_backward_inplace(uint32_t *restrict grad, const uint8_t *restrict mask, int64_t n, int threads) {
    FQ_LOOP({ grad[i] &= 0u - (uint32_t)mask[i]; })
}

/* top[0..k) sorted descending; v > top[k-1] takes its place */
static void insert_desc(float *top, int64_t k, float v) {
    int64_t j = k - 1;
    while (j > 0 && top[j - 1] < v) { top[j] = top[j - 1]; j--; }
    top[j] = v;
}

/* The k-th smallest (out[0]; 0 unless track_min) and k-th largest (out[1]) of the elements
   x[r*stride + i], r < rows, i < len; both NaN when one of them is NaN. work: 2k floats. Each row's
   extremes are taken first (vectorized); a row takes part in the ranking only if it can change it. */
void xnnq_tail_extremes(const float *x, int64_t rows, int64_t len, int64_t stride, int64_t k,
                        int track_min, float *work, float *out) {
    float *hi = work, *neg_lo = work + k;   /* neg_lo: the negated smallest values, descending */
    for (int64_t j = 0; j < k; j++) hi[j] = neg_lo[j] = -INFINITY;
    for (int64_t r = 0; r < rows; r++) {
        const float *p = x + r * stride;
        PREFETCH_RUN(r, rows, p, stride, len);
        float bmin = INFINITY, bmax = -INFINITY;
        int nan = 0;
        fold_extremes(p, len, &bmin, &bmax, &nan);
        if (nan) { out[0] = out[1] = NAN; return; }
        if (bmax > hi[k - 1])
            for (int64_t i = 0; i < len; i++)
                if (p[i] > hi[k - 1]) insert_desc(hi, k, p[i]);
        if (track_min && -bmin > neg_lo[k - 1])
            for (int64_t i = 0; i < len; i++)
                if (-p[i] > neg_lo[k - 1]) insert_desc(neg_lo, k, -p[i]);
    }
    out[0] = track_min ? -neg_lo[k - 1] : 0.0f;
    out[1] = hi[k - 1];
}

/* torch's lerp_(end, weight) of a float32 0-d tensor (aten/src/ATen/native/Lerp.h, the scalar loop): with fused
   multiply-adds where torch's build contracts them (`fused`, probed from torch once: cpu_kernels.lerp_fused),
   else with the product rounded first (volatile: the compiler may not contract it either) */
static float lerp_aten(float a, float b, float w, int fused) {
    float d = b - a;
    if (fabsf(w) < 0.5f) {
        if (fused) return fmaf(w, d, a);
        volatile float p = w * d;
        return a + p;
    }
    float c = 1.0f - w;
    if (fused) return fmaf(-d, c, b);
    volatile float p = d * c;
    return b - p;
}

/* One batch of the range tracker (xnnq/layers/range_tracker.py), as its torch ops compute it, written into its
   0-d buffers: the extremes; finite = isfinite(lo + hi) (float32); num_batches += finite; alpha =
   max(1 / max(num_batches, 1), ema); a finite batch lerps max_val (and min_val when track_min) towards its
   extremes with weight alpha (a non-finite batch moves nothing); nonfinite += !finite. Returns finite, or -1
   (nothing done) when the workspace of 2k floats cannot be allocated. */
int xnnq_tracker_batch(const float *x, int64_t rows, int64_t len, int64_t stride, int64_t k, int track_min,
                       float *min_val, float *max_val, int64_t *num_batches, int64_t *nonfinite, float ema,
                       int fused) {
    float out[2];
    float *work = malloc(2 * k * sizeof(float));
    if (!work) return -1;
    xnnq_tail_extremes(x, rows, len, stride, k, track_min, work, out);
    free(work);
    int finite = isfinite(out[0] + out[1]);
    *num_batches += finite;
    *nonfinite += !finite;
    if (finite) {
        float alpha = 1.0f / (float)(*num_batches < 1 ? 1 : *num_batches);
        if (alpha < ema) alpha = ema;
        *max_val = lerp_aten(*max_val, out[1], alpha, fused);
        if (track_min) *min_val = lerp_aten(*min_val, out[0], alpha, fused);
    }
    return finite;
}

/* ---- the weight path of a quantized conv/linear (xnnq/layers/fused_weight.py), as its torch ops compute it ----
   w: the folded float weight, rows x inner (rows = output channels), contiguous. */

/* ceil(log2 m) for a positive finite m, from the binary exponent (fake_quant.py ceil_log2) */
static inline int ceil_log2f(float m) {
    int ex;
    float mant = frexpf(m, &ex);
    return mant == 0.5f ? ex - 1 : ex;
}

/* fake_quant.py activation_scale of the range r = min(max(-lo, hi), cap) (pact2.py qparams; cap +inf when there
   is none; NaN propagates): max(r, min_range), rounded up to a power of two when power2 (a non-finite r gives
   NaN, as ceil_log2), divided by levels */
void xnnq_act_scale(const float *lo, const float *hi, float cap, float min_range, int power2, float levels,
                    float *out) {
    float a = -*lo, b = *hi;
    float r = isnan(a) || isnan(b) ? NAN : (a > b ? a : b);
    if (r > cap) r = cap;
    if (r < min_range) r = min_range;
    if (power2) r = isfinite(r) ? ldexpf(1.0f, ceil_log2f(r)) : NAN;
    *out = r / levels;
}

/* fake_quant.py weight_scale_from_max, power-of-2 rule: 2^(ceil(log2 m) - (bits - 1)), one step finer when
   m <= (2^(bits-2) + 0.5) times that, divided by 2^shift; m below 2^-24 taken as 2^-24 */
static inline float wq_scale_from_max(float m, int bits, int64_t shift) {
    if (m < 0x1p-24f) m = 0x1p-24f;
    int e = ceil_log2f(m) - (bits - 1);
    if (m <= ((float)(1 << (bits - 2)) + 0.5f) * ldexpf(1.0f, e)) e -= 1;
    return ldexpf(1.0f, e - (int)shift);
}

/* The clip bound and the scales of w (quant_weight.py constrain / quantize_weight): t = outlier_ratio * sigma
   from the caller; the bound is t when at most `limit` weights have |w| > t and t > 0, else +inf (returned in
   *bound); scale[r] (per channel: rows of them; else scale[0]) from min(max |w|, bound) and shift[r] (or
   shift[0]). Returns 1 (and computes nothing) when w holds a NaN or an infinity. */
int xnnq_wq_scale(const float *restrict w, int64_t rows, int64_t inner, float t, int64_t limit, int per_channel,
                  int bits, const int64_t *restrict shift, float *restrict scale, float *restrict bound,
                  int threads) {
    int64_t over = 0;
    int bad = 0;
    float *mx = malloc((size_t)rows * sizeof(float));
    if (!mx) return 2;
    _Pragma("omp parallel for schedule(static) num_threads(threads) if (rows * inner > PARALLEL_MIN) reduction(+:over) reduction(|:bad)")
    for (int64_t r = 0; r < rows; r++) {
        const float *p = w + r * inner;
        float m = 0.0f;
        _Pragma("omp simd reduction(max:m) reduction(+:over) reduction(|:bad)")
        for (int64_t i = 0; i < inner; i++) {
            float a = fabsf(p[i]);
            m = a > m ? a : m;
            over += a > t;
            bad |= !(a <= INFINITY) | (a == INFINITY);
        }
        mx[r] = m;
    }
    if (bad) { free(mx); return 1; }
    float b = (over <= limit && t > 0.0f) ? t : INFINITY;
    *bound = b;
    if (per_channel) {
        for (int64_t r = 0; r < rows; r++) scale[r] = wq_scale_from_max(mx[r] < b ? mx[r] : b, bits, shift[r]);
    } else {
        float m = 0.0f;
        for (int64_t r = 0; r < rows; r++) m = mx[r] > m ? mx[r] : m;
        scale[0] = wq_scale_from_max(m < b ? m : b, bits, shift[0]);
    }
    free(mx);
    return 0;
}

/* one weight: code of clamp(v, -bound, bound), its mask (|v| <= bound and the code does not saturate) and
   the fake-quantized value, as fake_quant.py _ClipFakeQuantSTE (round half to even; -0.0 kept) or, with
   plus_zero (no outlier clipping: fake_quant.py fake_quantize), with code 0 as +0.0 */
#define WQ_ELEMENT(v, Q, KEEP)                                                  \
    {                                                                           \
        float cl_ = (v) < -bound ? -bound : (v);                                \
        cl_ = cl_ > bound ? bound : cl_;                                        \
        float code_ = cl_ * inv;                                                \
        KEEP = (fabsf(v) <= bound) & (code_ > lo) & (code_ < hi);               \
        float k_ = code_ < qmin ? qmin : code_;                                 \
        k_ = k_ > qmax ? qmax : k_;                                             \
        float r_ = nearbyintf(k_);                                              \
        Q = (plus_zero && r_ == 0.0f ? 0.0f : r_) * s;                          \
    }

#define WQ_ROWS(...)                                                                            \
    _Pragma("omp parallel for schedule(static) num_threads(threads) if (rows * inner > PARALLEL_MIN)") \
    for (int64_t r = 0; r < rows; r++) {                                                        \
        const float s = scale[per_channel ? r : 0], inv = 1.0f / s;                             \
        __VA_ARGS__                                                                             \
    }

/* Forward. c NULL: out = q(w). c given (BatchNorm in training, quant_weight.py _train_weight), w = W * c per
   row: out = W on rows with c == 0, else q(w) / c. */
void xnnq_wq_forward(const float *restrict w, const float *restrict W, const float *restrict c, int64_t rows,
                     int64_t inner, float bound, const float *restrict scale, int per_channel, int plus_zero,
                     float qmin, float qmax, float lo, float hi, float *restrict out, int threads) {
    WQ_ROWS({
        const float *p = w + r * inner;
        float *o = out + r * inner;
        if (!c) {
            for (int64_t i = 0; i < inner; i++) { int keep; WQ_ELEMENT(p[i], o[i], keep) (void)keep; }
        } else if (c[r] == 0.0f) {
            for (int64_t i = 0; i < inner; i++) o[i] = W[r * inner + i];
        } else {
            const float cr = c[r];
            for (int64_t i = 0; i < inner; i++) { int keep; float q; WQ_ELEMENT(p[i], q, keep) (void)keep; o[i] = q / cr; }
        }
    })
}

/* Backward, the gradients autograd computes for the forward above from the output gradient g:
   c NULL: gw = mask ? g : +0.0 (the gradient of w).
   c given, with w = W * c recomputed, d = (c == 0), cc = d ? 1 : c, g3 = d ? 0 : g, g1 = mask ? g3 / cc : 0:
   gw = g1 * c + (d ? g : 0) (the gradient of W: the product's and the select's, added), p1 = g1 * W and
   p2 = d ? 0 : -g3 * ((q / cc) / cc), the terms whose sums over each row (torch's, by the caller) are the
   gradient of c. */
void xnnq_wq_backward(const float *restrict g, const float *restrict w, const float *restrict W,
                      const float *restrict c, int64_t rows, int64_t inner, float bound,
                      const float *restrict scale, int per_channel, int plus_zero, float qmin, float qmax,
                      float lo, float hi, float *restrict gw, float *restrict p1, float *restrict p2,
                      int threads) {
    WQ_ROWS({
        const float *gr = g + r * inner;
        float *o = gw + r * inner;
        if (!c) {
            const float *p = w + r * inner;
            for (int64_t i = 0; i < inner; i++) { int keep; float q; WQ_ELEMENT(p[i], q, keep) (void)q; o[i] = keep ? gr[i] : 0.0f; }
        } else if (c[r] == 0.0f) {
            for (int64_t i = 0; i < inner; i++) {
                o[i] = 0.0f * c[r] + gr[i];
                p1[r * inner + i] = 0.0f * W[r * inner + i];
                p2[r * inner + i] = 0.0f;
            }
        } else {
            const float cr = c[r];
            const float *Wr = W + r * inner;
            for (int64_t i = 0; i < inner; i++) {
                float v = Wr[i] * cr, q, g1;
                int keep;
                WQ_ELEMENT(v, q, keep)
                g1 = keep ? gr[i] / cr : 0.0f;
                o[i] = g1 * cr + 0.0f;
                p1[r * inner + i] = g1 * Wr[i];
                p2[r * inner + i] = -gr[i] * ((q / cr) / cr);
            }
        }
    })
}
"""

# tried in order: vectorized for this CPU and threaded; then plain (a compiler without OpenMP or -march=native,
# e.g. Apple clang: the loops then run on one thread)
FLAG_SETS = (
    ("-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC"),
    ("-O3", "-fno-math-errno", "-shared", "-fPIC"),
)
_lib: ctypes.CDLL | None = None
_lock = threading.Lock()


def _build() -> ctypes.CDLL:
    """Compile :data:`SOURCE` with ``$CC`` and load it; raises ``RuntimeError`` with the compiler's message."""
    cc = shlex.split(os.environ.get("CC", "cc"))
    with tempfile.TemporaryDirectory(prefix="xnnq-kernels-") as tmp:
        src, lib = Path(tmp) / "fq.c", Path(tmp) / "fq.so"
        src.write_text(SOURCE)
        for flags in FLAG_SETS:
            try:
                proc = subprocess.run([*cc, *flags, str(src), "-o", str(lib)], capture_output=True, text=True)
            except OSError as e:
                raise RuntimeError(f"no C compiler ({' '.join(cc)}: {e}); set CC") from e
            if proc.returncode == 0:
                break
        else:
            raise RuntimeError(f"{' '.join(cc)} failed: {proc.stderr.strip()[:500]}")
        handle = ctypes.CDLL(str(lib))  # the file may go once loaded
    p, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    handle.xnnq_fq_forward.argtypes = [p, p, p, i64, p, *([f32] * 5), i32]
    handle.xnnq_fq_forward.restype = None
    handle.xnnq_fq_forward_inplace.argtypes = [p, p, i64, p, *([f32] * 5), i32]
    handle.xnnq_fq_forward_inplace.restype = None
    handle.xnnq_tail_extremes.argtypes = [p, i64, i64, i64, i64, i32, p, p]
    handle.xnnq_tail_extremes.restype = None
    handle.xnnq_tracker_batch.argtypes = [p, i64, i64, i64, i64, i32, p, p, p, p, f32, i32]
    handle.xnnq_tracker_batch.restype = i32
    handle.xnnq_act_scale.argtypes = [p, p, f32, f32, i32, f32, p]
    handle.xnnq_act_scale.restype = None
    handle.xnnq_minmax.argtypes = [p, i64, p, i32]
    handle.xnnq_minmax.restype = None
    handle.xnnq_hist_add.argtypes = [p, i64, i64, i64, f32, f32, f32, i64, p, i32]
    handle.xnnq_hist_add.restype = None
    handle.xnnq_hist_sample.argtypes = [p, i64, i64, i64, f32, f32, f32, i64, p, p, p, p, i32]
    handle.xnnq_hist_sample.restype = i32
    handle.xnnq_add_row_sum.argtypes = [p, i64, i64, i64, p, p, i32]
    handle.xnnq_add_row_sum.restype = i32
    handle.xnnq_fq_backward_inplace.argtypes = [p, p, i64, i32]
    handle.xnnq_fq_backward_inplace.restype = None
    handle.xnnq_fq_backward.argtypes = [p, p, p, i64, i32]
    handle.xnnq_fq_backward.restype = None
    handle.xnnq_tqt_forward.argtypes = [p, p, p, p, i64, p, f32, f32, f32, i32]
    handle.xnnq_tqt_forward.restype = None
    handle.xnnq_tqt_backward.argtypes = [p, p, p, p, p, i64, *([f32] * 4), i32]
    handle.xnnq_tqt_backward.restype = None
    handle.xnnq_wq_scale.argtypes = [p, i64, i64, f32, i64, i32, i32, p, p, p, i32]
    handle.xnnq_wq_scale.restype = i32
    handle.xnnq_wq_forward.argtypes = [p, p, p, i64, i64, f32, p, i32, i32, *([f32] * 4), p, i32]
    handle.xnnq_wq_forward.restype = None
    handle.xnnq_wq_backward.argtypes = [p, p, p, p, i64, i64, f32, p, i32, i32, *([f32] * 4), p, p, p, i32]
    handle.xnnq_wq_backward.restype = None
    return handle


def built() -> bool:
    """Whether the kernel library is built and loaded in this process."""
    return _lib is not None


def library() -> ctypes.CDLL:
    """The loaded kernel library (built at the first call in the process)."""
    global _lib
    if _lib is None:
        with _lock:  # one build per process, also when threads start at once
            if _lib is None:
                _lib = _build()
    return _lib


def forward(
    flat: torch.Tensor, scale: torch.Tensor, consts: tuple[float, ...], with_mask: bool, inplace: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(out, mask)`` for the contiguous 1-d float32 CPU tensor ``flat`` and the 0-d float32 CPU ``scale``;
    ``consts`` is ``(qmin, qmax, lo, hi, cap)`` (``cap`` +inf when there is none). The reciprocal of ``scale``
    is taken in float32, as torch does. ``inplace``: ``out`` is ``flat``, overwritten."""
    lib = library()
    mask = torch.empty(flat.shape, dtype=torch.uint8) if with_mask else None
    mask_ptr = None if mask is None else mask.data_ptr()
    threads = torch.get_num_threads()
    if inplace:
        lib.xnnq_fq_forward_inplace(
            flat.data_ptr(), mask_ptr, flat.numel(), scale.data_ptr(), *consts, threads
        )
        return flat, mask
    out = torch.empty_like(flat)
    lib.xnnq_fq_forward(
        flat.data_ptr(), out.data_ptr(), mask_ptr, flat.numel(), scale.data_ptr(), *consts, threads
    )
    return out, mask


def backward(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``where(mask, grad, 0)`` for a float32 CPU ``grad`` dense in memory (contiguous or channels-last) and the
    uint8 ``mask`` in the same memory order; the result is laid out as ``grad`` and is not a view (autograd
    then sums it in place into another branch's gradient instead of allocating the sum)."""
    out = torch.empty_like(grad)
    library().xnnq_fq_backward(
        grad.data_ptr(), mask.data_ptr(), out.data_ptr(), grad.numel(), torch.get_num_threads()
    )
    return out


def backward_inplace(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """:func:`backward` written into ``grad`` (dense, in the mask's memory order), which is returned."""
    library().xnnq_fq_backward_inplace(
        grad.data_ptr(), mask.data_ptr(), grad.numel(), torch.get_num_threads()
    )
    return grad


def tqt_forward(
    x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, cap: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(out, codes, capmask)`` of a per-tensor TQT fake quantization of ``min(x, cap)`` (see the C source) for
    the contiguous float32 CPU tensor ``x`` and the 0-d float32 CPU ``scale``: new contiguous tensors of ``x``'s
    shape (not views: an in-place op may follow); ``capmask`` (uint8, ``x < cap``) is ``None`` without a cap."""
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    codes = torch.empty_like(out)
    capmask = None if cap is None else torch.empty(x.shape, dtype=torch.uint8)
    library().xnnq_tqt_forward(
        x.data_ptr(),
        out.data_ptr(),
        codes.data_ptr(),
        None if capmask is None else capmask.data_ptr(),
        x.numel(),
        scale.data_ptr(),
        float(qmin),
        float(qmax),
        math.inf if cap is None else float(cap),
        torch.get_num_threads(),
    )
    return out, codes, capmask


def tqt_backward(
    grad: torch.Tensor,
    codes: torch.Tensor,
    capmask: torch.Tensor | None,
    qmin: int,
    qmax: int,
    lo: float,
    hi: float,
    with_inner: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(grad_x, inner)`` of a per-tensor TQT backward (see the C source) for the contiguous float32 CPU
    ``grad`` and the saved ``codes`` (and ``capmask``, when there was a cap) of one shape; ``inner`` (1-d) is
    ``None`` unless ``with_inner``."""
    grad_x = torch.empty_like(grad)
    inner = torch.empty(codes.numel(), dtype=codes.dtype) if with_inner else None
    library().xnnq_tqt_backward(
        grad.data_ptr(),
        codes.data_ptr(),
        None if capmask is None else capmask.data_ptr(),
        grad_x.data_ptr(),
        None if inner is None else inner.data_ptr(),
        grad.numel(),
        float(qmin),
        float(qmax),
        lo,
        hi,
        torch.get_num_threads(),
    )
    return grad_x, inner


def tail_extremes(
    x: torch.Tensor, rows: int, length: int, stride: int, k: int, track_min: bool
) -> torch.Tensor:
    """``[k-th smallest, k-th largest]`` (float32, shape ``(2,)``) of the elements ``x[r·stride + i]``, ``r <
    rows``, ``i < length``, of the contiguous 1-d float32 CPU tensor ``x`` (the k-th smallest is 0 when not
    ``track_min``); both NaN when the elements hold a NaN."""
    work = torch.empty(2 * k + 2)
    library().xnnq_tail_extremes(
        x.data_ptr(), rows, length, stride, k, int(track_min), work.data_ptr(), work.data_ptr() + 8 * k
    )
    return work[2 * k :]


def tracker_batch(
    x: torch.Tensor,
    rows: int,
    length: int,
    stride: int,
    k: int,
    track_min: bool,
    min_val: torch.Tensor,
    max_val: torch.Tensor,
    num_batches: torch.Tensor,
    nonfinite: torch.Tensor,
    ema: float,
) -> None:
    """One range-tracker batch (see the C source) written into the tracker's 0-d CPU buffers ``min_val`` /
    ``max_val`` (float32), ``num_batches`` / ``nonfinite`` (int64; a non-finite batch is counted there), with
    torch's ``lerp_`` rounding (:func:`lerp_fused`)."""
    finite = library().xnnq_tracker_batch(
        x.data_ptr(),
        rows,
        length,
        stride,
        k,
        int(track_min),
        min_val.data_ptr(),
        max_val.data_ptr(),
        num_batches.data_ptr(),
        nonfinite.data_ptr(),
        ema,
        int(lerp_fused()),
    )
    if finite < 0:
        raise MemoryError(f"xnnq: no memory for the range tracker's workspace ({2 * k} floats)")


# a plain dict: torch.compile traces it without the warning a functools cache gets
_probed: dict[str, bool] = {}


def lerp_fused() -> bool:
    """Whether torch's ``lerp_`` of a float32 CPU scalar rounds ``a + w·(b − a)`` once (a fused multiply-add:
    builds for AVX2 / AVX-512 contract it) rather than after the product (the baseline build), probed once on
    a triple where the two differ, so that the C tracker's running range is torch's bit for bit."""
    fused = _probed.get("lerp")
    if fused is None:
        a, b, w = (torch.tensor(v) for v in (0.2856927514076233, 0.6898148655891418, 0.3968310058116913))
        fused = _probed["lerp"] = not torch.equal(a.clone().lerp_(b, w), a + w * (b - a))
    return fused


def act_scale(
    lo: torch.Tensor, hi: torch.Tensor, cap: float | None, min_range: float, power2: bool, levels: int
) -> torch.Tensor:
    """:func:`~xnnq.layers.fake_quant.activation_scale` of ``min(max(-lo, hi), cap)`` for the 0-d float32 CPU
    tensors ``lo`` / ``hi`` (a quantizer's range), as a new 0-d tensor: the same value (every step is exact)."""
    out = torch.empty(())
    library().xnnq_act_scale(
        lo.data_ptr(),
        hi.data_ptr(),
        math.inf if cap is None else cap,
        min_range,
        int(power2),
        float(levels),
        out.data_ptr(),
    )
    return out


def minmax(x: torch.Tensor) -> tuple[float, float]:
    """``(min, max)`` of the contiguous 1-d float32 CPU tensor ``x`` (non-empty) as Python floats; both NaN when
    ``x`` holds a NaN (as ``torch.aminmax``)."""
    out = (ctypes.c_float * 2)()
    library().xnnq_minmax(x.data_ptr(), x.numel(), out, torch.get_num_threads())
    return out[0], out[1]


def hist_add(
    x: torch.Tensor, rows: int, length: int, stride: int, cap: float, span: float, counts: torch.Tensor
) -> None:
    """Add to ``counts`` (contiguous float64 CPU, ``bins`` long) the histogram counts over ``[-span, span]`` of
    ``min(v, cap)`` for the elements ``v = x[r·stride + i]``, ``r < rows``, ``i < length``, of the contiguous
    1-d float32 CPU tensor ``x`` (values within the span, no NaN): ``bin_counts`` of
    :mod:`xnnq.calibrate.histogram`, the same counts."""
    bins = counts.numel()
    library().xnnq_hist_add(
        x.data_ptr(),
        rows,
        length,
        stride,
        cap,
        span,
        bins / (2.0 * span),
        bins,
        counts.data_ptr(),
        torch.get_num_threads(),
    )


def hist_sample(
    x: torch.Tensor,
    rows: int,
    length: int,
    stride: int,
    cap: float,
    span: float,
    counts: torch.Tensor,
    running: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[bool, float, float]:
    """The sample ``v = x[r·stride + i]`` (as :func:`hist_add`; ``x`` contiguous float32 CPU, of any shape) in
    one call: ``(counted, lo, hi)`` with ``lo``, ``hi`` the extremes of ``min(v, cap)`` (both NaN when a value
    is NaN). When they lie within ``[-span, span]`` (``span > 0``) the sample's counts are added to ``counts``
    as :func:`hist_add` adds them and ``counted`` is True; otherwise nothing is counted. ``running``: two
    float32 CPU scalars, the running minimum and maximum, lowered / raised to ``lo`` / ``hi`` unless a value
    is NaN (as ``clamp_`` would, without two more torch calls)."""
    ext = (ctypes.c_float * 3)()
    bins = counts.numel()
    counted = library().xnnq_hist_sample(
        x.data_ptr(),
        rows,
        length,
        stride,
        cap,
        span,
        bins / (2.0 * span) if span > 0 else 0.0,
        bins,
        counts.data_ptr(),
        ext,
        None if running is None else running[0].data_ptr(),
        None if running is None else running[1].data_ptr(),
        torch.get_num_threads(),
    )
    if ext[2]:
        return False, math.nan, math.nan
    return bool(counted), ext[0], ext[1]


# torch's vector width of float32 in its sum kernel, by CPU capability, where its sum order is the one
# xnnq_add_row_sum follows (checked bit for bit in tests/test_fused.py); elsewhere (ARM, ...) torch's own sum
# is used. AVX-512 CPUs run the AVX2 sum kernel (8 floats): ATen's SumKernel.cpp registers sum_stub with
# REGISTER_DISPATCH, not ALSO_REGISTER_AVX512_DISPATCH ("these kernels are slower with AVX512 than with AVX2").
_ROW_SUM_VEC = {"AVX2": 8, "AVX512": 8, "DEFAULT": 8}


@functools.cache
def _row_sum_vec() -> int | None:
    """torch's float32 vector width where :func:`add_row_sum` follows its sum order, else ``None``."""
    return _ROW_SUM_VEC.get(torch.backends.cpu.get_cpu_capability())


def add_row_sum_applies(x: torch.Tensor) -> bool:
    """Whether :func:`add_row_sum` reproduces torch's ``x.sum(0)`` for ``x`` (float32, CPU, contiguous, at least
    8 values per row, on a CPU whose torch vector width it follows)."""
    return (
        x.is_cpu
        and x.dtype == torch.float32
        and x.dim() >= 2
        and x.is_contiguous()
        and x.shape[0] > 0
        and x.numel() // x.shape[0] >= 8
        and _row_sum_vec() is not None
    )


def add_row_sum(x: torch.Tensor, total: torch.Tensor, count: torch.Tensor | None = None) -> None:
    """``total += x.sum(0)`` for ``x`` where :func:`add_row_sum_applies` and a contiguous float64 ``total`` of
    shape ``x.shape[1:]``: the float32 sum over the first dimension in torch's order (the same bits), added in
    float64, in one pass without the float32 temporary. ``count`` (an int64 CPU scalar): ``+= x.shape[0]``."""
    status = library().xnnq_add_row_sum(
        x.data_ptr(),
        x.shape[0],
        total.numel(),
        _row_sum_vec(),
        total.data_ptr(),
        None if count is None else count.data_ptr(),
        torch.get_num_threads(),
    )
    if status:
        raise MemoryError("add_row_sum: no memory for the workspace of the batch sum")
