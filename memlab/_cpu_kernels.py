"""Fused CPU kernels for the 8-bit optimizer step, compiled from C on first use.

Why: the eager step (``memlab.optim._sgd8bit_step`` / ``_adam8bit_step``) runs ~15-30 passes of
separate torch ops over each tensor (decode: byte -> index -> table -> x absmax; update; |x|,
block max, divide; encode: bits -> key -> two table lookups -> compare), where torch's fp32
``foreach`` optimizer runs 3-7. On a CPU those passes, not the arithmetic, set the time
(measured ~6x torch's SGD and ~4.5x its Adam on one core). ``torch.compile`` does not help here:
inductor's code for this gather-heavy step measured no faster than eager. So the step is one C
loop per block of ``block_size`` elements: read the codes, decode, update the parameter and the
states in fp32, take the block's new absmax, and encode, touching each byte of memory once.

The math is the same as the eager functions', operation for operation and rounding for rounding
(the eager path stays the reference; tests run both and require the same bits): dequantize
``code[c] * absmax``; torch's CPU update rules in float32, which fuse some multiply-adds (checked
against torch element by element): ``add(x, alpha=a)`` is ``fma(x, a, self)``, ``lerp`` is
``fma(w, g - m, m)`` for w < 0.5 else ``fma(-(g - m), 1 - w, g)``, ``addcmul`` is
``fma(value * g, g, v)``, ``addcdiv`` is ``p + (value * m) / denom`` (no fusion); every other
product is rounded on its own (``-ffp-contract=off``, explicit ``fmaf`` where torch fuses).
Quantize by dividing by the block's absmax (1 for an all-zero block) and rounding to the nearest
code with the same 16-bit table + one comparison as :class:`memlab.quant._Codebook` (ties go to
the lower code); a positive second moment never gets the zero code (see :mod:`memlab.quant`).
A NaN anywhere in a block makes that block's absmax NaN, like ``torch.amax``.

With AVX-512 (F/BW/DQ/VBMI, from ``-march=native``) blocks run 16 lanes at a time: decode looks
up 64 codes per step in the value table's four byte planes (``vpermi2b``, no gather); the update
is the same operations in vector form; encode gathers one entry per value from a compact table
(:func:`enc_table`, ~12 KB per sign, L1-resident, equivalent to the 16-bit tables: checked on
every float in [-1, 1] of both maps). Blocks with a non-finite absmax, a length that is not a
multiple of 64/16, or maps the compact table cannot hold take the scalar code. Measured (AMD
EPYC Zen 4, 1 thread, CPU time of one 4.18 M tensor): Adam 25.0 -> 7.5 ms, SGD 7.0 -> 3.5 ms;
torch fused Adam 3.0, SGD 2.1: the gathers of the encode are what is left. Splitting a tensor
across threads (whole blocks each) gives the same bits as one thread.

Building: ``cc -O3 -march=native -ffp-contract=off -shared -fPIC`` (``$CC`` if set) into
``$MEMLAB_CACHE`` (default ``~/.cache/memlab``)/kernels, keyed by a hash of the source, the
flags, the compiler and the CPU (model and feature flags: ``-march=native``); written
atomically, so concurrent processes are safe. The folder must be private (``memlab._private``:
ours, mode 0700, no ancestor others can write to without the sticky bit), and a cached library
is loaded only if it is a regular file of ours, not group/world-writable, whose sha256 matches
the one recorded when it was built; otherwise it is rebuilt. When the cache cannot be made
private, the library is compiled into a fresh ``tempfile`` folder for this process alone
(never a predictable shared path). When there is no C compiler, or it
fails, or ``MEMLAB_CPU_KERNEL=0``, :func:`library` returns None and the optimizers use the eager
torch path (a warning says why, once). No Python C API and no torch headers: the library is
called through ctypes with raw pointers, which also releases the GIL, so large tensors are split
across ``torch.get_num_threads()`` Python threads.
"""

from __future__ import annotations

import ctypes
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from memlab import _cbuild
from memlab._private import user_cache_root

__all__ = ["library", "available", "sgd8bit", "adam8bit"]

SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VBMI__)
#include <immintrin.h>
#define VEC 1
#else
#define VEC 0
#endif

typedef union { float f; uint32_t u; } pun;
static inline uint32_t bits_of(float x) { pun c; c.f = x; return c.u; }
static inline float float_of(uint32_t b) { pun c; c.u = b; return c.f; }

/* compact encode table: for |x| <= 1 only the keys (sign, exponent, 7 mantissa bits) from 2^-24
   up to 1.0 can hold a midpoint of a dynamic map; every smaller key shares entry 0 of its sign.
   entry = lower candidate | (low 16 bits of the one midpoint inside the key's range) << 8 */
#define KLO (103 << 7)
#define KHI (127 << 7)
#define NK (KHI - KLO + 2)

int memlab_enc_size(void) { return 2 * NK; }

/* Build the compact table from the 16-bit one; -1 if this map does not fit it (a midpoint
   below 2^-24 in magnitude): the kernels then use the 16-bit table. */
int memlab_enc_table(const int32_t *lut, const float *lut_mid, uint32_t *out) {
    for (uint32_t s = 0; s < 2; s++) {
        int32_t tiny = -1;
        for (uint32_t k = 0; k <= KHI; k++) {
            uint32_t key16 = (s << 15) | k, orig = key16 ^ 0x8000u;
            int32_t base = lut[orig];
            uint32_t mb = bits_of(lut_mid[orig]);
            int inside = (mb >> 16) == key16;
            if (base < 0 || base > 255) return -1;
            uint32_t thr = inside ? (mb & 0xffffu) : (s ? 0u : 0xffffu);  /* never true */
            if (k < KLO) {                            /* all tiny keys: one entry */
                if (inside || (tiny >= 0 && tiny != base)) return -1;
                tiny = base;
                out[s * NK] = (uint32_t)base | (thr << 8);
            } else {
                out[s * NK + (k - KLO + 1)] = (uint32_t)base | (thr << 8);
            }
        }
    }
    return 0;
}

static float block_absmax(const float *x, int64_t len) {
    uint32_t mx = 0;
    for (int64_t i = 0; i < len; i++) {
        uint32_t b = bits_of(x[i]) & 0x7fffffffu;
        mx = b > mx ? b : mx;
    }
    return float_of(mx);
}

static void encode_block(const float *x, int64_t len, float amax, uint8_t *codes,
                         const int32_t *lut, const float *lut_mid, int32_t keep) {
    float scale = (amax == 0.0f) ? 1.0f : amax;
    for (int64_t i = 0; i < len; i++) {
        float xn = x[i] / scale;
        int32_t key = ((int32_t)bits_of(xn) >> 16) + 32768;
        int32_t c = lut[key] + (xn > lut_mid[key]);
        codes[i] = (uint8_t)(c + ((c == keep) & (xn > 0.0f)));
    }
}

#if VEC
typedef struct { __m512i t[4][4]; __m512i perm; } dec_t;   /* byte planes of the 256 values */

static void dec_init(dec_t *d, const float *code) {
    uint8_t planes[4][256] __attribute__((aligned(64)));
    const uint8_t *b = (const uint8_t *)code;
    for (int i = 0; i < 256; i++)
        for (int j = 0; j < 4; j++) planes[j][i] = b[4 * i + j];
    for (int j = 0; j < 4; j++)
        for (int q = 0; q < 4; q++) d->t[j][q] = _mm512_load_si512(planes[j] + 64 * q);
    uint8_t perm[64] __attribute__((aligned(64)));
    for (int p = 0; p < 64; p++) perm[p] = (uint8_t)(16 * ((p >> 2) & 3) + 4 * (p >> 4) + (p & 3));
    d->perm = _mm512_load_si512(perm);
}

/* code[c] for 64 codes, as 4 x 16 floats in order */
static inline void dec64(const dec_t *d, const uint8_t *c, __m512 out[4]) {
    __m512i cp = _mm512_permutexvar_epi8(d->perm, _mm512_loadu_si512(c));
    __mmask64 hi = _mm512_movepi8_mask(cp);
    __m512i P[4];
    for (int j = 0; j < 4; j++)
        P[j] = _mm512_mask_blend_epi8(hi, _mm512_permutex2var_epi8(d->t[j][0], cp, d->t[j][1]),
                                      _mm512_permutex2var_epi8(d->t[j][2], cp, d->t[j][3]));
    __m512i a = _mm512_unpacklo_epi8(P[0], P[1]), b = _mm512_unpackhi_epi8(P[0], P[1]);
    __m512i e = _mm512_unpacklo_epi8(P[2], P[3]), f = _mm512_unpackhi_epi8(P[2], P[3]);
    out[0] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(a, e));
    out[1] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(a, e));
    out[2] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(b, f));
    out[3] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(b, f));
}

/* nearest code of 16 normalised values (|xn| <= 1), as the scalar encoder */
static inline __m128i enc16(__m512 xn, const uint32_t *tab, int32_t keep) {
    __m512i u = _mm512_castps_si512(xn);
    __m512i k = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x7fff));
    __m512i t = _mm512_max_epi32(_mm512_sub_epi32(k, _mm512_set1_epi32(KLO - 1)),
                                 _mm512_setzero_si512());
    __mmask16 neg = _mm512_movepi32_mask(u);
    t = _mm512_mask_add_epi32(t, neg, t, _mm512_set1_epi32(NK));
    __m512i e = _mm512_i32gather_epi32(t, (const void *)tab, 4);
    __m512i base = _mm512_and_si512(e, _mm512_set1_epi32(0xff));
    __m512i thr = _mm512_srli_epi32(e, 8);
    __m512i lo = _mm512_and_si512(u, _mm512_set1_epi32(0xffff));
    __mmask16 gt = _mm512_mask_cmpgt_epu32_mask((__mmask16)~neg, lo, thr)
                 | _mm512_mask_cmplt_epu32_mask(neg, lo, thr);
    __m512i one = _mm512_set1_epi32(1);
    __m512i c = _mm512_mask_add_epi32(base, gt, base, one);
    if (keep >= 0) {
        __mmask16 z = _mm512_cmpeq_epi32_mask(c, _mm512_set1_epi32(keep))
                    & _mm512_cmp_ps_mask(xn, _mm512_setzero_ps(), _CMP_GT_OQ);
        c = _mm512_mask_add_epi32(c, z, c, one);
    }
    return _mm512_cvtepi32_epi8(c);
}

static inline __m512i absbits(__m512 x) {
    return _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7fffffff));
}

/* encode a block (len % 16 == 0) whose absmax is finite: vector; else the scalar encoder */
static void encode_vec(const float *x, int64_t len, float amax, uint8_t *codes,
                       const uint32_t *tab, const int32_t *lut, const float *lut_mid,
                       int32_t keep) {
    if (!tab || !(amax < INFINITY) || (len & 15)) {    /* NaN / inf block: |x/amax| <= 1 fails */
        encode_block(x, len, amax, codes, lut, lut_mid, keep);
        return;
    }
    __m512 sc = _mm512_set1_ps(amax == 0.0f ? 1.0f : amax);
    for (int64_t i = 0; i < len; i += 16)
        _mm_storeu_si128((__m128i *)(codes + i), enc16(_mm512_div_ps(_mm512_loadu_ps(x + i), sc),
                                                        tab, keep));
}
#endif

/* SGD (+momentum) as torch.optim.SGD; blocks [b0, b1) of a flat tensor of n elements. */
int memlab_sgd8bit(float *p, const float *g, uint8_t *codes, float *absmax, int64_t n,
                    int64_t block, int64_t b0, int64_t b1, const float *restrict code,
                    const int32_t *lut, const float *lut_mid, const uint32_t *tab, float lr,
                    float momentum, float keep, float wd, int nesterov, int maximize, int first) {
    float *buf = (float *)malloc(sizeof(float) * block + 64);
    if (!buf) return -1;                                /* nothing written: the caller raises */
    float sign = maximize ? -1.0f : 1.0f;
#if VEC
    dec_t D;
    dec_init(&D, code);
    const __m512 vsign = _mm512_set1_ps(sign), vwd = _mm512_set1_ps(wd),
                 vkeep = _mm512_set1_ps(keep), vmom = _mm512_set1_ps(momentum),
                 vnlr = _mm512_set1_ps(-lr);
#endif
    for (int64_t b = b0; b < b1; b++) {
        int64_t s = b * block, len = (s + block <= n) ? block : n - s;
        float am = absmax[b];
        float *restrict ps = p + s;
        const float *restrict gs = g + s;
        const uint8_t *restrict cs = codes + s;
        int64_t i0 = 0;
#if VEC
        const __m512 vam = _mm512_set1_ps(am);
        __m512i mx = _mm512_setzero_si512();
        for (; i0 + 64 <= len; i0 += 64) {
            __m512 dv[4];
            if (!first) dec64(&D, cs + i0, dv);
            for (int r = 0; r < 4; r++) {
                int64_t i = i0 + 16 * r;
                __m512 pv = _mm512_loadu_ps(ps + i);
                __m512 gi = _mm512_mul_ps(vsign, _mm512_loadu_ps(gs + i));
                if (wd != 0.0f) gi = _mm512_fmadd_ps(pv, vwd, gi);
                __m512 m = first ? gi : _mm512_fmadd_ps(gi, vkeep,
                                        _mm512_mul_ps(_mm512_mul_ps(dv[r], vam), vmom));
                __m512 u = nesterov ? _mm512_fmadd_ps(m, vmom, gi) : m;
                _mm512_storeu_ps(ps + i, _mm512_fmadd_ps(u, vnlr, pv));
                _mm512_storeu_ps(buf + i, m);
                mx = _mm512_max_epu32(mx, absbits(m));
            }
        }
        uint32_t mxs = _mm512_reduce_max_epu32(mx);
#endif
        for (int64_t i = i0; i < len; i++) {
            float gi = sign * gs[i];
            if (wd != 0.0f) gi = fmaf(ps[i], wd, gi);                 /* g.add(p, alpha=wd) */
            float m = first ? gi : fmaf(gi, keep, code[cs[i]] * am * momentum);
            float u = nesterov ? fmaf(m, momentum, gi) : m;
            ps[i] = fmaf(u, -lr, ps[i]);                              /* p.add_(u, alpha=-lr) */
            buf[i] = m;
        }
#if VEC
        uint32_t tb = bits_of(block_absmax(buf + i0, len - i0));
        float amax = float_of(tb > mxs ? tb : mxs);
        encode_vec(buf, len, amax, codes + s, tab, lut, lut_mid, -1);
#else
        float amax = block_absmax(buf, len);
        encode_block(buf, len, amax, codes + s, lut, lut_mid, -1);
#endif
        absmax[b] = amax;
    }
    free(buf);
    return 0;
}

/* Adam / AdamW as torch.optim; exp_avg signed map (cm, am_), exp_avg_sq unsigned (cv, av_). */
int memlab_adam8bit(float *p, const float *g, uint8_t *cm, float *am_, uint8_t *cv, float *av_,
                     int64_t n, int64_t block, int64_t b0, int64_t b1,
                     const float *restrict code_m, const int32_t *lut_m, const float *mid_m,
                     const uint32_t *tab_m, const float *restrict code_v, const int32_t *lut_v,
                     const float *mid_v, const uint32_t *tab_v,
                     float w, float beta2, float w2, float eps, float wd, float decay,
                     int decoupled, int maximize, float step_size, float bc2_sqrt,
                     int32_t zero_v) {
    float *buf = (float *)malloc(sizeof(float) * 2 * block + 64);
    if (!buf) return -1;                                /* nothing written: the caller raises */
    float *restrict bm = buf, *restrict bv = buf + block;
    float sign = maximize ? -1.0f : 1.0f;
    int l2 = !decoupled && wd != 0.0f;
    if (!(decoupled && wd != 0.0f)) decay = 1.0f;
    int lerp_low = w < 0.5f;
#if VEC
    dec_t DM, DV;
    dec_init(&DM, code_m);
    dec_init(&DV, code_v);
    const __m512 vsign = _mm512_set1_ps(sign), vwd = _mm512_set1_ps(wd),
                 vdecay = _mm512_set1_ps(decay), vw = _mm512_set1_ps(w),
                 v1w = _mm512_set1_ps(1.0f - w), vb2 = _mm512_set1_ps(beta2),
                 vw2 = _mm512_set1_ps(w2), vbc2 = _mm512_set1_ps(bc2_sqrt),
                 veps = _mm512_set1_ps(eps), vnst = _mm512_set1_ps(-step_size);
    const __m512i sgn = _mm512_set1_epi32((int)0x80000000u);
#endif
    for (int64_t b = b0; b < b1; b++) {
        int64_t s = b * block, len = (s + block <= n) ? block : n - s;
        float sm = am_[b], sv = av_[b];
        float *restrict ps = p + s;
        const float *restrict gs = g + s;
        const uint8_t *restrict cms = cm + s, *restrict cvs = cv + s;
        int64_t i0 = 0;
#if VEC
        const __m512 vsm = _mm512_set1_ps(sm), vsv = _mm512_set1_ps(sv);
        __m512i mxm = _mm512_setzero_si512(), mxv = _mm512_setzero_si512();
        for (; i0 + 64 <= len; i0 += 64) {
            __m512 dm[4], dv[4];
            dec64(&DM, cms + i0, dm);
            dec64(&DV, cvs + i0, dv);
            for (int r = 0; r < 4; r++) {
                int64_t i = i0 + 16 * r;
                __m512 pk = _mm512_mul_ps(_mm512_loadu_ps(ps + i), vdecay);
                __m512 gi = _mm512_mul_ps(vsign, _mm512_loadu_ps(gs + i));
                if (l2) gi = _mm512_fmadd_ps(pk, vwd, gi);
                __m512 m = _mm512_mul_ps(dm[r], vsm), v = _mm512_mul_ps(dv[r], vsv);
                __m512 d = _mm512_sub_ps(gi, m);
                m = lerp_low ? _mm512_fmadd_ps(vw, d, m)
                             : _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_xor_si512(
                                   _mm512_castps_si512(d), sgn)), v1w, gi);
                v = _mm512_fmadd_ps(_mm512_mul_ps(vw2, gi), gi, _mm512_mul_ps(v, vb2));
                __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(v), vbc2), veps);
                _mm512_storeu_ps(ps + i, _mm512_add_ps(pk, _mm512_div_ps(_mm512_mul_ps(vnst, m),
                                                                          denom)));
                _mm512_storeu_ps(bm + i, m);
                _mm512_storeu_ps(bv + i, v);
                mxm = _mm512_max_epu32(mxm, absbits(m));
                mxv = _mm512_max_epu32(mxv, absbits(v));
            }
        }
        uint32_t mxms = _mm512_reduce_max_epu32(mxm), mxvs = _mm512_reduce_max_epu32(mxv);
#endif
        for (int64_t i = i0; i < len; i++) {
            float pk = ps[i] * decay;                     /* decay == 1 unless AdamW: exact */
            float g0 = sign * gs[i];
            float gi = l2 ? fmaf(pk, wd, g0) : g0;
            float m = code_m[cms[i]] * sm, v = code_v[cvs[i]] * sv;
            float d = gi - m;                                 /* m.lerp_(g, w), as torch: */
            m = lerp_low ? fmaf(w, d, m) : fmaf(-d, 1.0f - w, gi);
            v = fmaf(w2 * gi, gi, v * beta2);                 /* v.mul_(b2).addcmul_(g, g, w2) */
            float denom = sqrtf(v) / bc2_sqrt + eps;
            ps[i] = pk + ((-step_size) * m) / denom;         /* p.addcdiv_(m, denom, -lr') */
            bm[i] = m;
            bv[i] = v;
        }
#if VEC
        uint32_t tm = bits_of(block_absmax(bm + i0, len - i0));
        uint32_t tv = bits_of(block_absmax(bv + i0, len - i0));
        float mmax = float_of(tm > mxms ? tm : mxms), vmax = float_of(tv > mxvs ? tv : mxvs);
        encode_vec(bm, len, mmax, cm + s, tab_m, lut_m, mid_m, -1);
        encode_vec(bv, len, vmax, cv + s, tab_v, lut_v, mid_v, zero_v);
#else
        float mmax = block_absmax(bm, len), vmax = block_absmax(bv, len);
        encode_block(bm, len, mmax, cm + s, lut_m, mid_m, -1);
        encode_block(bv, len, vmax, cv + s, lut_v, mid_v, zero_v);   /* v > 0 never 0 */
#endif
        am_[b] = mmax;
        av_[b] = vmax;
    }
    free(buf);
    return 0;
}

/* testing: codes of normalised values through the fast encoder (len % 16 == 0), or -1 */
int memlab_encode_fast(const float *xn, int64_t len, uint8_t *codes, const uint32_t *tab,
                       int32_t keep) {
#if VEC
    if (len & 15) return -1;
    for (int64_t i = 0; i < len; i += 16)
        _mm_storeu_si128((__m128i *)(codes + i), enc16(_mm512_loadu_ps(xn + i), tab, keep));
    return 0;
#else
    (void)xn; (void)len; (void)codes; (void)tab; (void)keep;
    return -1;
#endif
}
"""

FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC"]
MIN_PER_THREAD = 1 << 16          # elements: below this one thread is faster than handing off

_lock = threading.Lock()
_pool: Optional[ThreadPoolExecutor] = None
_pool_size = 0


def _cache_dir() -> Path:
    return user_cache_root() / "kernels"


_cpu_id = _cbuild.cpu_id
_compiler = _cbuild.compiler


def _lib_name(cc: str) -> str:
    """File name of the library: a hash of the source, flags, compiler, platform and CPU."""
    return _cbuild.lib_name("opt8bit", SOURCE, FLAGS, cc, _cpu_id())


def _build() -> Path:
    """Path of a kernel library this process may load (memlab._cbuild: private cache, sha256
    checked, CPU in the key; a private temporary folder when the cache is unsafe)."""
    cc = _compiler()
    if not cc:
        raise RuntimeError("no C compiler found (set $CC or install gcc)")
    flag_sets = (FLAGS, [f for f in FLAGS if f != "-march=native"])   # e.g. older clang
    return _cbuild.build(_lib_name(cc), SOURCE, flag_sets, cc, warnings.warn)


def _declare(lib) -> None:
    f32p, u8p, i64 = ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64
    f, i = ctypes.c_float, ctypes.c_int
    lib.memlab_sgd8bit.argtypes = [f32p, f32p, u8p, f32p, i64, i64, i64, i64, f32p, u8p, f32p,
                                   u8p, f, f, f, f, i, i, i]
    lib.memlab_sgd8bit.restype = ctypes.c_int
    lib.memlab_adam8bit.argtypes = [f32p, f32p, u8p, f32p, u8p, f32p, i64, i64, i64, i64,
                                    f32p, u8p, f32p, u8p, f32p, u8p, f32p, u8p,
                                    f, f, f, f, f, f, i, i, f, f, ctypes.c_int32]
    lib.memlab_adam8bit.restype = ctypes.c_int
    lib.memlab_enc_size.argtypes = []
    lib.memlab_enc_size.restype = ctypes.c_int
    lib.memlab_enc_table.argtypes = [u8p, f32p, u8p]
    lib.memlab_enc_table.restype = ctypes.c_int
    lib.memlab_encode_fast.argtypes = [f32p, i64, u8p, u8p, ctypes.c_int32]
    lib.memlab_encode_fast.restype = ctypes.c_int


_LIBRARY = _cbuild.LazyLibrary(lambda: _build(), lambda lib: _declare(lib),
                               "fused CPU kernel for the 8-bit optimizers", "the slower eager torch step")


def library():
    """The loaded kernel library, or None (no compiler, build failed, or MEMLAB_CPU_KERNEL=0)."""
    return _LIBRARY.get()


def available() -> bool:
    return library() is not None


def usable(p: Tensor, grad: Tensor) -> bool:
    """Whether the fused kernel can update ``p`` in place: a real (not fake), contiguous
    float32 CPU tensor with a float32 contiguous gradient."""
    return (p.device.type == "cpu" and p.dtype == torch.float32 and grad.dtype == torch.float32
            and p.is_contiguous() and grad.is_contiguous() and type(p.data) is Tensor
            and type(grad) is Tensor and not p.is_sparse and p.numel() > 0)


def _ptr(t: Tensor) -> int:
    return t.data_ptr()


def _bump(*tensors: Tensor) -> None:
    """Tell autograd the tensors changed in place (writes through pointers bypass torch), so
    e.g. a backward through a graph that saved the parameter before the step still errors."""
    inc = getattr(torch.autograd.graph, "increment_version", None)
    if inc is not None:
        for t in tensors:
            inc(t)


def _run_blocks(fn, nblocks: int, numel: int, args_before, args_after) -> None:
    """Call ``fn(*args_before, b0, b1, *args_after)`` over all blocks, split across threads."""
    global _pool, _pool_size
    threads = min(torch.get_num_threads(), max(1, numel // MIN_PER_THREAD), nblocks)
    if threads <= 1:
        codes = [fn(*args_before, 0, nblocks, *args_after)]
        _raise_on_failure(codes)
        return
    if _pool is None or _pool_size < threads:
        with _lock:
            if _pool is None or _pool_size < threads:
                _pool, _pool_size = ThreadPoolExecutor(threads, "memlab-opt8bit"), threads
    edges = [nblocks * t // threads for t in range(threads + 1)]
    futures = [_pool.submit(fn, *args_before, edges[t], edges[t + 1], *args_after)
               for t in range(1, threads)]
    codes = [fn(*args_before, edges[0], edges[1], *args_after)]   # this thread: first share
    codes += [fut.result() for fut in futures]
    _raise_on_failure(codes)


def _raise_on_failure(codes) -> None:
    if any(c != 0 for c in codes):
        raise MemoryError("memlab fused 8-bit step: could not allocate its per-thread scratch "
                          "buffer (up to 2 x block_size floats)")


def _fits(t: Tensor, dtype: torch.dtype, numel: int) -> bool:
    """``t`` may be handed to C as a dense array of ``numel`` ``dtype`` elements: a real CPU
    tensor of that dtype and size, contiguous (no stride-0 or overlapping view), whose storage
    really holds those bytes past its offset."""
    return (type(t) is Tensor and t.device.type == "cpu" and t.dtype == dtype
            and t.numel() == numel and t.is_contiguous() and not t.is_sparse
            and t.untyped_storage().nbytes() >= (t.storage_offset() + numel) * t.element_size())


def _check_args(p: Tensor, grad: Tensor, states) -> None:
    """Validate every tensor before a raw pointer is taken (a crafted checkpoint can hold a
    stride-0 view or a short storage that the C loop would run past): ValueError naming it."""
    n = p.numel()
    if not _fits(p, torch.float32, n):
        raise ValueError(f"param must be a contiguous float32 CPU tensor, got {p.dtype} "
                         f"{tuple(p.shape)} strides {p.stride()}")
    if not _fits(grad, torch.float32, n):
        raise ValueError(f"grad must be a contiguous float32 CPU tensor of {n} elements, got "
                         f"{grad.dtype} {tuple(grad.shape)} strides {grad.stride()}")
    for name, q in states:
        bs = q.block_size
        if isinstance(bs, bool) or not isinstance(bs, int) or bs <= 0:
            raise ValueError(f"{name}: block_size must be a positive int, got {bs!r}")
        blocks = -(-n // bs)
        if not _fits(q.codes, torch.uint8, n):
            raise ValueError(f"{name}_codes must be a contiguous uint8 tensor of {n} elements "
                             f"with its own storage, got {q.codes.dtype} {tuple(q.codes.shape)} "
                             f"strides {q.codes.stride()}")
        if not _fits(q.absmax, torch.float32, blocks):
            raise ValueError(f"{name}_absmax must be a contiguous float32 tensor of {blocks} "
                             f"values (block_size={bs}), got {q.absmax.dtype} "
                             f"{tuple(q.absmax.shape)} strides {q.absmax.stride()}")
        book = q._book
        if not (_fits(book.code, torch.float32, 256) and _fits(book.lut32, torch.int32, 65536)
                and _fits(book.lut_mid, torch.float32, 65536)):
            raise ValueError(f"{name}: the code book has no 16-bit lookup table")


_TABLES: dict = {}                # id(codebook) -> (codebook, compact encode table or None)


def enc_table(book) -> Optional[Tensor]:
    """The kernels' compact encode table of a codebook (int32, ~12 KB per sign: one entry per
    key from 2^-24 to 1.0 holding the lower candidate and the low 16 bits of the midpoint in
    that key's range, built from and equivalent to ``book.lut32`` / ``book.lut_mid``), or None
    when the map has a midpoint below 2^-24 (the kernels then use the 16-bit tables)."""
    hit = _TABLES.get(id(book))
    if hit is not None and hit[0] is book:
        return hit[1]
    lib = library()
    tab = torch.zeros(lib.memlab_enc_size(), dtype=torch.int32)
    if lib.memlab_enc_table(_ptr(book.lut32), _ptr(book.lut_mid), _ptr(tab)) != 0:
        tab = None
    with _lock:
        if len(_TABLES) >= 64:                 # user maps: keep the cache bounded
            _TABLES.clear()
        _TABLES[id(book)] = (book, tab)
    return tab


def _book_ptrs(q) -> tuple:
    book = q._book
    tab = enc_table(book)
    return (_ptr(book.code), _ptr(book.lut32), _ptr(book.lut_mid),
            None if tab is None else _ptr(tab))


def sgd8bit(p: Tensor, grad: Tensor, buf, *, lr: float, momentum: float, dampening: float,
            weight_decay: float, nesterov: bool, maximize: bool, first: bool) -> None:
    """Fused SGD8bit step for one tensor; ``buf`` a QTensor (momentum > 0)."""
    lib = library()
    _check_args(p, grad, [("momentum_buffer", buf)])
    n, block = p.numel(), buf.block_size
    nb = buf.absmax.numel()
    _run_blocks(lib.memlab_sgd8bit, nb, n,
                (_ptr(p), _ptr(grad), _ptr(buf.codes), _ptr(buf.absmax), n, block),
                (*_book_ptrs(buf), float(lr), float(momentum), float(1 - dampening),
                 float(weight_decay), int(nesterov), int(maximize), int(first)))
    _bump(p, buf.codes, buf.absmax)


def adam8bit(p: Tensor, grad: Tensor, exp_avg, exp_avg_sq, *, step: int, lr: float,
             beta1: float, beta2: float, eps: float, weight_decay: float, decoupled: bool,
             maximize: bool) -> None:
    """Fused Adam8bit / AdamW8bit step for one tensor; both moments QTensors."""
    lib = library()
    _check_args(p, grad, [("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)])
    if exp_avg_sq.block_size != exp_avg.block_size:
        raise ValueError(f"exp_avg and exp_avg_sq must share a block_size, got "
                         f"{exp_avg.block_size} and {exp_avg_sq.block_size}")
    n, block = p.numel(), exp_avg.block_size
    nb = exp_avg.absmax.numel()
    step_size = lr / (1 - beta1 ** step)
    bc2_sqrt = (1 - beta2 ** step) ** 0.5
    _run_blocks(lib.memlab_adam8bit, nb, n,
                (_ptr(p), _ptr(grad), _ptr(exp_avg.codes), _ptr(exp_avg.absmax),
                 _ptr(exp_avg_sq.codes), _ptr(exp_avg_sq.absmax), n, block),
                (*_book_ptrs(exp_avg), *_book_ptrs(exp_avg_sq), float(1 - beta1), float(beta2),
                 float(1 - beta2), float(eps), float(weight_decay), float(1 - lr * weight_decay),
                 int(decoupled), int(maximize), float(step_size), float(bc2_sqrt),
                 int(exp_avg_sq._book.zero_index)))
    _bump(p, exp_avg.codes, exp_avg.absmax, exp_avg_sq.codes, exp_avg_sq.absmax)
