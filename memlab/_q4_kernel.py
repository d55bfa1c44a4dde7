"""The 4-bit Adam step of one CPU tensor in C (:mod:`memlab.optim4bit`): the same bits as the
torch-op step, without its ~80 passes over memory.

The torch step (:func:`memlab.optim4bit._adam4bit_step`, by chunks in :mod:`memlab._q4_chunks`)
decodes both moments to fp32, updates them and the parameter, and encodes them again, one torch
op at a time: 168 ms for the 4.18 M parameters of ``memlab bench optim``; this step takes 15.3 ms
(torch's fused fp32 Adam: 5.9 ms; one thread). One C loop does it per element, with the same
float operations in the same order (``-ffp-contract=off``; ``fmaf`` where torch's CPU kernels
fuse: ``lerp``, ``addcmul``, ``add`` with ``alpha``; a correctly rounded square root, as the
torch step takes), so the two paths give the same codes, scales and parameters bit for bit
(tested); no fp32 copy of the moments exists. With AVX-512 the 16 map values and 15 midpoints
are held in one register each: a code decodes with one permute and encodes with a 4-step binary
search (the same count as the 15 comparisons of the plain loop, which other CPUs run).

* Block-wise second moment (1-D tensors, and where rank-1 scales would cost more): one pass over
  the blocks of ``block_size``; each block's new moments go to a small buffer, their absmax is
  taken, and they are encoded (true division by the absmax; the nearest code, NaN -> 15 as
  ``torch.bucketize``, or dithered: the thresholds of :func:`memlab.quant4.dither` computed in
  the loop from the element's index, one multiply-add) and packed two a byte.
* Rank-1 second moment: the new per-axis maxima are needed before any v can be encoded, so a
  first pass computes the new v of every element and only its maxima, and the second computes it
  again (nothing was written yet) with m and the parameter, and encodes both.

Used for contiguous float32 CPU tensors and gradients with an even block size (a byte never
spans two blocks); everything else (CUDA, other dtypes) takes the torch step; on fake tensors
(``memlab.memory.estimate``) a step the kernel would do allocates nothing. ``MEMLAB_CPU_KERNEL=0``
turns it off. Threads: torch's count, in an OpenMP team over the blocks (whole blocks per thread,
rank-1 maxima combined by max: the same bits for any split), at least 256 blocks a thread.
"""

from __future__ import annotations

import ctypes
import warnings
from pathlib import Path

import torch
from torch import Tensor

from memlab import _cbuild

SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* Every loop over a block's elements is plain arithmetic over arrays, for the compiler's
   vectorizer (-O3 -march=native); the rank-1 index bookkeeping is per row segment. */

static inline uint32_t ubits(float x) { uint32_t b; memcpy(&b, &x, 4); return b; }
static inline float ufloat(uint32_t b) { float x; memcpy(&x, &b, 4); return x; }

static float absmax(const float *restrict x, int64_t n) {   /* torch.amax(x.abs()), NaN wins */
    uint32_t mx = 0;
    for (int64_t i = 0; i < n; i++) {
        uint32_t b = ubits(x[i]) & 0x7fffffffu;
        mx = b > mx ? b : mx;
    }
    return ufloat(mx);
}

static inline float nanmin(float a, float b) {             /* torch.minimum */
    return (a != a) ? a : ((b != b) ? b : (a < b ? a : b));
}

/* map values of the codes of elements [s, s + len), s even */
#if defined(__AVX512F__) && defined(__AVX512DQ__) && defined(__AVX512BW__)
#include <immintrin.h>
#define VEC 1
#else
#define VEC 0
#endif

static void decode(const uint8_t *restrict codes, int64_t s, int64_t len,
                   const float *restrict tab, float scale, float *restrict out) {
    const uint8_t *c = codes + (s >> 1);
    int64_t j = 0;
#if VEC
    /* 32 codes a step: the 16-value map lives in one register (vpermps) */
    const __m512 T = _mm512_loadu_ps(tab), S = _mm512_set1_ps(scale);
    const __m512i lo_hi0 = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22,
                                             7, 23);
    const __m512i lo_hi1 = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14,
                                             30, 15, 31);
    const __m512i m15 = _mm512_set1_epi32(15);
    for (; j + 16 <= len / 2; j += 16) {
        __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(c + j)));
        __m512 lo = _mm512_permutexvar_ps(_mm512_and_si512(b, m15), T);
        __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), T);
        _mm512_storeu_ps(out + 2 * j, _mm512_mul_ps(_mm512_permutex2var_ps(lo, lo_hi0, hi), S));
        _mm512_storeu_ps(out + 2 * j + 16,
                         _mm512_mul_ps(_mm512_permutex2var_ps(lo, lo_hi1, hi), S));
    }
#endif
    for (; j < len / 2; j++) {
        out[2 * j] = tab[c[j] & 15] * scale;
        out[2 * j + 1] = tab[c[j] >> 4] * scale;
    }
    if (len & 1) out[len - 1] = tab[c[len / 2] & 15] * scale;
}

#define DITHER_I 3242174889u     /* memlab.quant4.DITHER_I */

/* codes of x / scale (scale 0 -> 1), packed into elements [s, s + len) of the tensor, s even:
   the nearest map values (tab NULL: the midpoints mid), or dithered (memlab.quant4's
   _encode_dithered: between the values lo <= xn < hi, hi when u * (hi - lo) < xn - lo; u from
   the element's index and base, memlab.quant4.dither) */
static void encode(const float *restrict x, const float *restrict sc, float s1, int64_t len,
                   const float *restrict mid, const float *restrict tab, uint32_t base,
                   uint8_t *restrict tmp, uint8_t *restrict codes, int64_t s) {
    uint8_t *o = codes + (s >> 1);
    int64_t i = 0;
#if VEC
    /* 32 values a step: a 4-step binary search over 15 sorted thresholds held in one register
       (nearest: the midpoints, counting those below xn, as the 15 comparisons below;
       dithered: the values 1..14 and inf, counting those <= xn) */
    float th16[16], gap16[16];
    for (int k = 0; k < 15; k++) {
        th16[k] = tab ? (k < 14 ? tab[k + 1] : INFINITY) : mid[k];
        gap16[k] = tab ? tab[k + 1] - tab[k] : 1.0f;
    }
    th16[15] = INFINITY;
    gap16[15] = 1.0f;
    const __m512 M = _mm512_loadu_ps(th16), G = _mm512_loadu_ps(gap16), one = _mm512_set1_ps(1.0f);
    const __m512 V = tab ? _mm512_loadu_ps(tab) : one;
    const __m512 Q1 = _mm512_set1_ps(s1 == 0.0f ? 1.0f : s1);
    const __m512i v15 = _mm512_set1_epi32(15), v14 = _mm512_set1_epi32(14);
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i CI = _mm512_set1_epi32((int)DITHER_I), B = _mm512_set1_epi32((int)base);
    const __m512 U = _mm512_set1_ps(0x1p-24f);
    const int pred = tab ? _CMP_GE_OQ : _CMP_GT_OQ;
    for (; i + 32 <= len; i += 32) {
        __m512i cc[2];
        for (int h = 0; h < 2; h++) {
            __m512 q = Q1;
            if (sc) {
                q = _mm512_loadu_ps(sc + i + 16 * h);
                q = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(q, _mm512_setzero_ps(), _CMP_EQ_OQ),
                                         q, one);
            }
            __m512 xn = _mm512_div_ps(_mm512_loadu_ps(x + i + 16 * h), q);
            __m512i c = _mm512_setzero_si512();
            static const int steps[4] = {8, 4, 2, 1};
            for (int t = 0; t < 4; t++) {
                __m512i at = _mm512_add_epi32(c, _mm512_set1_epi32(steps[t] - 1));
                __m512 th = _mm512_permutexvar_ps(at, M);
                __mmask16 up = pred == _CMP_GE_OQ ? _mm512_cmp_ps_mask(xn, th, _CMP_GE_OQ)
                                                  : _mm512_cmp_ps_mask(xn, th, _CMP_GT_OQ);
                c = _mm512_mask_add_epi32(c, up, c, _mm512_set1_epi32(steps[t]));
            }
            if (tab) {
                c = _mm512_min_epu32(c, v14);                    /* +inf: the last pair */
                __m512 d = _mm512_sub_ps(xn, _mm512_permutexvar_ps(c, V));
                __m512i idx = _mm512_add_epi32(_mm512_set1_epi32((int)(uint32_t)(s + i + 16 * h)),
                                               lane);
                __m512i hh = _mm512_add_epi32(_mm512_mullo_epi32(idx, CI), B);
                __m512 u = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(hh, 8)), U);
                u = _mm512_mul_ps(u, _mm512_permutexvar_ps(c, G));
                c = _mm512_mask_add_epi32(c, _mm512_cmp_ps_mask(u, d, _CMP_LT_OQ), c,
                                          _mm512_set1_epi32(1));
            }
            cc[h] = _mm512_mask_mov_epi32(c, _mm512_cmp_ps_mask(xn, xn, _CMP_UNORD_Q), v15);
        }
        for (int h = 0; h < 2; h++) {       /* code 2j | code 2j+1 << 4 from each 64-bit lane */
            __m512i q = _mm512_or_si512(cc[h], _mm512_srli_epi64(cc[h], 28));
            _mm_storel_epi64((__m128i *)(o + i / 2 + 8 * h), _mm512_cvtepi64_epi8(q));
        }
    }
#endif
    const int64_t done = i;                 /* even: the rest starts on a byte */
    for (; i < len; i++) {
        float q = sc ? sc[i] : s1;
        q = (q == 0.0f) ? 1.0f : q;
        float xn = x[i] / q;
        int c = 0;
        if (tab) {
            for (int k = 1; k < 15; k++) c += xn >= tab[k];       /* torch.searchsorted */
            float d = xn - tab[c];
            uint32_t hh = (uint32_t)(s + i) * DITHER_I + base;
            c += ((float)(hh >> 8) * 0x1p-24f) * (tab[c + 1] - tab[c]) < d;
        } else {
            for (int k = 0; k < 15; k++) c += xn > mid[k];       /* torch.bucketize */
        }
        tmp[i - done] = (uint8_t)((xn != xn) ? 15 : c);
    }
    const int64_t rest = len - done;
    uint8_t *ot = o + done / 2;
    for (int64_t j = 0; j < rest / 2; j++) ot[j] = (uint8_t)(tmp[2 * j] | (tmp[2 * j + 1] << 4));
    if (rest & 1) ot[rest / 2] = tmp[rest - 1];                   /* odd tail: high nibble 0 */
}

typedef struct {
    float w, beta2, w2, eps, wd, decay, step_size, bc2_sqrt;
    int l2, maximize, lerp_low;
} hp_t;

/* m, v <- their new values (as torch.optim.Adam/AdamW); p too when write_p */
static void update(const hp_t *h, float *restrict p, const float *restrict g,
                   float *restrict m, float *restrict v, int64_t len, int write_p) {
    const float w = h->w, w1 = 1.0f - h->w, b2 = h->beta2, w2 = h->w2, wd = h->wd;
    const float decay = h->decay, nst = -h->step_size, root = h->bc2_sqrt, eps = h->eps;
    const float sign = h->maximize ? -1.0f : 1.0f;
    const int l2 = h->l2, low = h->lerp_low;
    for (int64_t i = 0; i < len; i++) {
        float q = p[i] * decay;                          /* decay == 1 unless AdamW: exact */
        float g0 = sign * g[i];
        float gi = l2 ? fmaf(q, wd, g0) : g0;            /* g.add(p, alpha=wd) */
        float d = gi - m[i];                             /* m.lerp_(g, w) */
        float mo = low ? fmaf(w, d, m[i]) : fmaf(-d, w1, gi);
        float vo = fmaf(w2 * gi, gi, v[i] * b2);         /* v.mul_(b2).addcmul_(g, g, w2) */
        m[i] = mo;
        v[i] = vo;
        if (write_p) p[i] = q + (nst * mo) / (sqrtf(vo) / root + eps);   /* p.addcdiv_ */
    }
}

/* the multi-index over the leading k - 1 axes of row r (of the last axis), and the step to the
   next row (a counter with carry: no division per row) */
static void row_index(int k, const int64_t *dims, int64_t r, int64_t *idx) {
    for (int j = k - 2; j >= 0; j--) { idx[j] = r % dims[j]; r /= dims[j]; }
}
static inline void row_next(int k, const int64_t *dims, int64_t *idx) {
    for (int j = k - 2; j >= 0; j--) {
        if (++idx[j] < dims[j]) return;
        idx[j] = 0;
    }
}

/* rank-1: out[i] = min_j S_j[i_j] for elements [e0, e0 + len) */
static void scales(const float *restrict S, int k, const int64_t *dims, int64_t e0,
                   int64_t len, float *restrict out) {
    int64_t L = dims[k - 1], lead = 0, idx[8], off[8];
    for (int j = 0; j < k - 1; j++) { off[j] = lead; lead += dims[j]; }
    const float *last = S + lead;
    int64_t c = e0 % L, i = 0;
    row_index(k, dims, e0 / L, idx);
    while (i < len) {
        float pre = S[idx[0]];                           /* the row's min over the lead axes */
        for (int j = 1; j < k - 1; j++) pre = nanmin(pre, S[off[j] + idx[j]]);
        int64_t seg = L - c < len - i ? L - c : len - i;
        for (int64_t t = 0; t < seg; t++) out[i + t] = nanmin(pre, last[c + t]);
        i += seg; c = 0;
        row_next(k, dims, idx);
    }
}

/* rank-1: the maxima (as bits) of v >= 0 over elements [e0, e0 + len), into M */
static void maxima(uint32_t *restrict M, int k, const int64_t *dims, int64_t e0, int64_t len,
                   const float *restrict v) {
    int64_t L = dims[k - 1], lead = 0, idx[8], off[8];
    for (int j = 0; j < k - 1; j++) { off[j] = lead; lead += dims[j]; }
    uint32_t *last = M + lead;
    int64_t c = e0 % L, i = 0;
    row_index(k, dims, e0 / L, idx);
    while (i < len) {
        int64_t seg = L - c < len - i ? L - c : len - i;
        uint32_t mx = 0;
        for (int64_t t = 0; t < seg; t++) {
            uint32_t b = ubits(v[i + t]) & 0x7fffffffu;
            mx = b > mx ? b : mx;
            last[c + t] = b > last[c + t] ? b : last[c + t];
        }
        for (int j = 0; j < k - 1; j++) {
            uint32_t *t = M + off[j] + idx[j];
            *t = mx > *t ? mx : *t;
        }
        i += seg; c = 0;
        row_next(k, dims, idx);
    }
}

/* rank-1 over k > 2 axes as over two: axis 0 and the flattened trailing axes, whose scales are
   T[r] = min_{j >= 1} S_j[i_j(r)] (min and max are exact and associative: the same values) */
static void trail_table(const float *S, int k, const int64_t *dims, float *T) {
    int64_t off[8], idx[8], o = 0, R = 1;
    for (int j = 0; j < k; j++) { off[j] = o; o += dims[j]; idx[j] = 0; }
    for (int j = 1; j < k; j++) R *= dims[j];
    for (int64_t r = 0; r < R; r++) {
        float t = S[off[1] + idx[1]];
        for (int j = 2; j < k; j++) t = nanmin(t, S[off[j] + idx[j]]);
        T[r] = t;
        for (int j = k - 1; j >= 1; j--) { if (++idx[j] < dims[j]) break; idx[j] = 0; }
    }
}

/* the maxima of each trailing axis from the maxima MT over axis 0 of the flattened trailing axes */
static void trail_reduce(const uint32_t *MT, int k, const int64_t *dims, uint32_t *M) {
    int64_t off[8], idx[8], o = 0, R = 1;
    for (int j = 0; j < k; j++) { off[j] = o; o += dims[j]; idx[j] = 0; }
    for (int j = 1; j < k; j++) R *= dims[j];
    for (int64_t j = off[1]; j < o; j++) M[j] = 0;
    for (int64_t r = 0; r < R; r++) {
        for (int j = 1; j < k; j++) {
            uint32_t *t = M + off[j] + idx[j];
            *t = MT[r] > *t ? MT[r] : *t;
        }
        for (int j = k - 1; j >= 1; j--) { if (++idx[j] < dims[j]) break; idx[j] = 0; }
    }
}

typedef struct {           /* one thread's block buffers */
    float *bm, *bv, *sc; uint8_t *tmp;
} work_t;

static int work_alloc(work_t *w, int64_t block) {
    w->bm = (float *)malloc(sizeof(float) * 3 * block + 64);
    w->tmp = (uint8_t *)malloc(block + 64);
    if (!w->bm || !w->tmp) { free(w->bm); free(w->tmp); return -1; }
    w->bv = w->bm + block;
    w->sc = w->bv + block;
    return 0;
}

/* pass 1 over blocks [B0, B1): the maxima of the new v into M (bits, zeroed by the caller) */
static void pass1(const hp_t *h, const float *p, const float *g, int64_t n, int64_t block,
                  int64_t B0, int64_t B1, const uint8_t *cv, const float *code_v,
                  const float *S_old, const int64_t *d2, uint32_t *M, work_t *w) {
    for (int64_t b0 = B0 * block; b0 < n && b0 < B1 * block; b0 += block) {
        int64_t len = b0 + block <= n ? block : n - b0;
        scales(S_old, 2, d2, b0, len, w->sc);
        decode(cv, b0, len, code_v, 1.0f, w->bv);
        for (int64_t i = 0; i < len; i++) { w->bv[i] *= w->sc[i]; w->bm[i] = 0.0f; }
        update(h, (float *)p + b0, g + b0, w->bm, w->bv, len, 0);   /* p only read */
        maxima(M, 2, d2, b0, len, w->bv);
    }
}

/* pass 2 (or the only one) over blocks [B0, B1): update, write p, encode both moments */
static void pass2(const hp_t *h, float *p, const float *g, int64_t n, int64_t block,
                  int64_t B0, int64_t B1, uint8_t *cm, float *am, uint8_t *cv, float *vs,
                  int k, const float *code_m, const float *mid_m, const float *code_v,
                  const float *mid_v, const float *S_old, const float *S_new,
                  const int64_t *d2, int dither, uint32_t base_m, uint32_t base_v, work_t *w) {
    const float *tm = dither ? code_m : NULL, *tv = dither ? code_v : NULL;
    for (int64_t bi = B0, b0 = B0 * block; bi < B1 && b0 < n; bi++, b0 += block) {
        int64_t len = b0 + block <= n ? block : n - b0;
        decode(cm, b0, len, code_m, am[bi], w->bm);
        if (k) {
            scales(S_old, 2, d2, b0, len, w->sc);
            decode(cv, b0, len, code_v, 1.0f, w->bv);
            for (int64_t i = 0; i < len; i++) w->bv[i] *= w->sc[i];
        } else {
            decode(cv, b0, len, code_v, vs[bi], w->bv);
        }
        update(h, p + b0, g + b0, w->bm, w->bv, len, 1);
        am[bi] = absmax(w->bm, len);
        encode(w->bm, NULL, am[bi], len, mid_m, tm, base_m, w->tmp, cm, b0);
        if (k) {
            scales(S_new, 2, d2, b0, len, w->sc);
            encode(w->bv, w->sc, 0.0f, len, mid_v, tv, base_v, w->tmp, cv, b0);
        } else {
            vs[bi] = absmax(w->bv, len);
            encode(w->bv, NULL, vs[bi], len, mid_v, tv, base_v, w->tmp, cv, b0);
        }
    }
}

#ifdef _OPENMP                                  /* one thread: no team */
#define TEAM(nt, BODY) if (nt == 1) { int t_ = 0, k_ = 1; BODY } else \
    _Pragma("omp parallel num_threads(nt)") { int t_ = omp_get_thread_num(), \
    k_ = omp_get_num_threads(); BODY }
#else
#define TEAM(nt, BODY) { int t_ = 0, k_ = 1; (void)nt; BODY }
#endif

int memlab_adam4bit(int nt, float *p, const float *g, int64_t n, int64_t block,
                    uint8_t *cm, float *am, uint8_t *cv, float *vs, int k, const int64_t *dims,
                    const float *code_m, const float *mid_m, const float *code_v,
                    const float *mid_v, float w, float beta2, float w2, float eps, float wd,
                    float decay, int l2, int maximize, float step_size, float bc2_sqrt,
                    int dither, uint32_t base_m, uint32_t base_v) {
    hp_t h = {w, beta2, w2, eps, wd, decay, step_size, bc2_sqrt, l2, maximize, w < 0.5f};
    int64_t tot = 0, R = 1, nb = (n + block - 1) / block;
    for (int j = 0; j < k; j++) tot += dims[j];
    for (int j = 1; j < k; j++) R *= dims[j];
    if (nt < 1) nt = 1;
    if (nt > nb) nt = (int)nb;
    int64_t d2[2] = {k ? dims[0] : 0, R}, t2 = k ? d2[0] + R : 0;
    /* nmax: the per-axis maxima (tot); so, sn: scales of the two-axis view, old and new; M: one
       two-axis maxima vector per thread */
    float *buf = (float *)malloc(sizeof(float) * (tot + 2 * t2 + (int64_t)nt * t2) + 64);
    if (!buf) return -1;                                        /* nothing written */
    uint32_t *nmax = (uint32_t *)buf, *M = (uint32_t *)(buf + tot + 2 * t2);
    float *so = buf + tot, *sn = so + t2;
    const float *S_old = vs, *S_new = (const float *)nmax;     /* two axes: as they are */
    if (k > 2) {
        memcpy(so, vs, sizeof(float) * d2[0]);
        trail_table(vs, k, dims, so + d2[0]);
        S_old = so;
        S_new = sn;
    }
    work_t *W = (work_t *)calloc((size_t)nt, sizeof(work_t));   /* every thread's buffers */
    int ok = W != NULL;
    for (int t = 0; ok && t < nt; t++) ok = work_alloc(&W[t], block) == 0;
    if (!ok) {                                       /* nothing written: the caller raises */
        for (int t = 0; W && t < nt; t++) { free(W[t].bm); free(W[t].tmp); }
        free(W); free(buf);
        return -1;
    }
    if (k) {                                   /* pass 1: the new per-axis maxima of v */
        for (int64_t j = 0; j < (int64_t)nt * t2; j++) M[j] = 0;
        TEAM(nt, {
            pass1(&h, p, g, n, block, nb * t_ / k_, nb * (t_ + 1) / k_, cv, code_v, S_old, d2,
                  M + (int64_t)t_ * t2, &W[t_]);
        })
        for (int t = 1; t < nt; t++)                           /* max over the threads: exact */
            for (int64_t j = 0; j < t2; j++) M[j] = M[t * t2 + j] > M[j] ? M[t * t2 + j] : M[j];
        if (k > 2) {                           /* back to per-axis maxima, and their table */
            memcpy(nmax, M, sizeof(uint32_t) * d2[0]);
            trail_reduce(M + d2[0], k, dims, nmax);
            memcpy(sn, nmax, sizeof(float) * d2[0]);
            trail_table((const float *)nmax, k, dims, sn + d2[0]);
        } else {
            memcpy(nmax, M, sizeof(uint32_t) * tot);
        }
    }
    TEAM(nt, {
        pass2(&h, p, g, n, block, nb * t_ / k_, nb * (t_ + 1) / k_, cm, am, cv, vs, k, code_m,
              mid_m, code_v, mid_v, S_old, S_new, d2, dither, base_m, base_v, &W[t_]);
    })
    if (k) memcpy(vs, nmax, sizeof(float) * tot);
    for (int t = 0; t < nt; t++) { free(W[t].bm); free(W[t].tmp); }
    free(W);
    free(buf);
    return 0;
}
"""

FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math",
         "-fno-strict-aliasing", "-fopenmp", "-shared", "-fPIC"]   # maxima: bits read as floats
MIN_BLOCKS_PER_THREAD = 256       # 32 K elements: below this, one thread


def _build(threads: bool) -> Path:
    cc = _cbuild.compiler()
    if not cc:
        raise RuntimeError("no C compiler found (set $CC or install gcc)")
    flags = FLAGS if threads else [f for f in FLAGS if f != "-fopenmp"]
    name = _cbuild.lib_name("adam4bit-mt" if threads else "adam4bit", SOURCE, flags, cc,
                            _cbuild.cpu_id())
    flag_sets = (flags, [f for f in flags if f != "-march=native"])
    return _cbuild.build(name, SOURCE, flag_sets, cc, warnings.warn)


def _declare(lib) -> None:
    P, L, F, N, U = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_uint32
    lib.memlab_adam4bit.argtypes = [N, P, P, L, L, P, P, P, P, N, P, P, P, P, P,
                                    F, F, F, F, F, F, N, N, F, F, N, U, U]
    lib.memlab_adam4bit.restype = ctypes.c_int


# two builds of the one source: -fopenmp costs the single-thread loops ~18% (the 2048 x 2048
# step at one thread: 23.6-24.1 ms without, 27.6-28.9 with), so one thread takes the build
# without it
_LIBRARY = _cbuild.LazyLibrary(lambda: _build(False), lambda lib: _declare(lib),
                               "C kernel for the 4-bit Adam step", "the torch-op step")
_LIBRARY_MT = _cbuild.LazyLibrary(lambda: _build(True), lambda lib: _declare(lib),
                                  "threaded C kernel for the 4-bit Adam step",
                                  "its single-thread build")


def library():
    """The loaded (single-thread) library, or None (no compiler, build failed, or
    MEMLAB_CPU_KERNEL=0)."""
    return _LIBRARY.get()


def _dense(t: Tensor, dtype: torch.dtype) -> bool:
    return (t.device.type == "cpu" and t.dtype == dtype and t.is_contiguous()
            and not t.is_sparse)


def eligible(p: Tensor, grad: Tensor, exp_avg, exp_avg_sq) -> bool:
    """Whether the kernel steps ``p`` (real or fake): both moments 4-bit with one even block
    size, contiguous float32 CPU parameter and gradient, at most 8 rank-1 axes."""
    from memlab.quant4 import Q4Tensor, _dims
    if not (isinstance(exp_avg, Q4Tensor) and isinstance(exp_avg_sq, Q4Tensor)):
        return False
    if exp_avg.rank1 or exp_avg_sq.block_size != exp_avg.block_size or exp_avg.block_size % 2:
        return False
    if exp_avg_sq.rank1 and not 2 <= len(_dims(exp_avg_sq.shape)) <= 8:
        return False
    return (_dense(p, torch.float32) and _dense(grad, torch.float32) and p.numel() > 0
            and grad.shape == p.shape
            and all(_dense(t, d) for t, d in ((exp_avg.codes, torch.uint8),
                                              (exp_avg.scale, torch.float32),
                                              (exp_avg_sq.codes, torch.uint8),
                                              (exp_avg_sq.scale, torch.float32)))
            and library() is not None)


def real(*ts: Tensor) -> bool:
    """No fake tensor among ``ts`` (their pointers may be taken)."""
    return all(type(t) is Tensor or type(t) is torch.nn.Parameter for t in ts)


def adam4bit_step(p: Tensor, grad: Tensor, exp_avg, exp_avg_sq, *, step: int, lr: float,
                  beta1: float, beta2: float, eps: float, weight_decay: float, decoupled: bool,
                  maximize: bool, dither: bool = False) -> None:
    """:func:`memlab.optim4bit._adam4bit_step` for tensors :func:`eligible` accepts (real)."""
    from memlab._cpu_kernels import _bump
    from memlab.quant4 import _dims, _table, dither_base
    blocks = -(-p.numel() // exp_avg.block_size)
    threads = max(1, min(torch.get_num_threads(), blocks // MIN_BLOCKS_PER_THREAD))
    lib = (_LIBRARY_MT.get() if threads > 1 else None) or library()
    threads = threads if lib is not library() else 1
    code_m, mid_m = _table(True, p.device)
    code_v, mid_v = _table(False, p.device)
    rank1 = exp_avg_sq.rank1
    dims = torch.tensor(_dims(p.shape) if rank1 else [0], dtype=torch.int64)
    l2 = weight_decay != 0 and not decoupled
    decay = 1 - lr * weight_decay if (decoupled and weight_decay != 0) else 1.0
    rc = lib.memlab_adam4bit(
        threads, p.data_ptr(), grad.data_ptr(), p.numel(), exp_avg.block_size,
        exp_avg.codes.data_ptr(), exp_avg.scale.data_ptr(), exp_avg_sq.codes.data_ptr(),
        exp_avg_sq.scale.data_ptr(), len(_dims(p.shape)) if rank1 else 0, dims.data_ptr(),
        code_m.data_ptr(), mid_m.data_ptr(), code_v.data_ptr(), mid_v.data_ptr(),
        1 - beta1, beta2, 1 - beta2, eps, weight_decay, decay, int(l2), int(maximize),
        lr / (1 - beta1 ** step), (1 - beta2 ** step) ** 0.5, int(dither),
        dither_base(step, True), dither_base(step, False))
    if rc != 0:
        raise MemoryError("memlab: the 4-bit step could not allocate its block buffers")
    _bump(p, exp_avg.codes, exp_avg.scale, exp_avg_sq.codes, exp_avg_sq.scale)
