"""The 4-bit Adam step of one CPU tensor in C (:mod:`memlab.optim4bit`): the same bits as the
torch-op step, without its ~80 passes over memory.

The torch step (:func:`memlab.optim4bit._adam4bit_step`, by chunks in :mod:`memlab._q4_chunks`)
decodes both moments to fp32, updates them and the parameter, and encodes them again, one torch
op at a time: 168 ms for the 4.18 M parameters of ``memlab bench optim`` (torch's fused fp32 Adam:
5.8 ms). Here one C loop does it per element, with the same float operations in the same order
(``-ffp-contract=off``; ``fmaf`` where torch's CPU kernels fuse: ``lerp``, ``addcmul``, ``add``
with ``alpha``; a correctly rounded square root, as the torch step takes), so the two paths give
the same codes, scales and parameters bit for bit (tested); no fp32 copy of the moments exists.

* Block-wise second moment (1-D tensors, and where rank-1 scales would cost more): one pass over
  the blocks of ``block_size``; each block's new moments go to a small buffer, their absmax is
  taken, and they are encoded (true division by the absmax, nearest code, NaN -> 15 as
  ``torch.bucketize``) and packed two a byte.
* Rank-1 second moment: the new per-axis maxima are needed before any v can be encoded, so a
  first pass computes the new v of every element and only its maxima, and the second computes it
  again (nothing was written yet) with m and the parameter, and encodes both.

Used for contiguous float32 CPU tensors and gradients with an even block size (a byte never
spans two blocks); everything else (CUDA, other dtypes, fake tensors of ``memlab.memory
.estimate``) takes the torch step. ``MEMLAB_CPU_KERNEL=0`` turns it off. One thread.
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
static void decode(const uint8_t *restrict codes, int64_t s, int64_t len,
                   const float *restrict tab, float scale, float *restrict out) {
    const uint8_t *c = codes + (s >> 1);
    for (int64_t j = 0; j < len / 2; j++) {
        out[2 * j] = tab[c[j] & 15] * scale;
        out[2 * j + 1] = tab[c[j] >> 4] * scale;
    }
    if (len & 1) out[len - 1] = tab[c[len / 2] & 15] * scale;
}

/* nearest codes of x / scale (scale 0 -> 1), packed into elements [s, s + len), s even */
static void encode(const float *restrict x, const float *restrict sc, float s1, int64_t len,
                   const float *restrict mid, uint8_t *restrict tmp, uint8_t *restrict codes,
                   int64_t s) {
    for (int64_t i = 0; i < len; i++) {
        float q = sc ? sc[i] : s1;
        q = (q == 0.0f) ? 1.0f : q;
        float xn = x[i] / q;
        int c = 0;
        for (int k = 0; k < 15; k++) c += xn > mid[k];           /* torch.bucketize */
        tmp[i] = (uint8_t)((xn != xn) ? 15 : c);
    }
    uint8_t *o = codes + (s >> 1);
    for (int64_t j = 0; j < len / 2; j++) o[j] = (uint8_t)(tmp[2 * j] | (tmp[2 * j + 1] << 4));
    if (len & 1) o[len / 2] = tmp[len - 1];                       /* odd tail: high nibble 0 */
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

int memlab_adam4bit(float *p, const float *g, int64_t n, int64_t block,
                    uint8_t *cm, float *am, uint8_t *cv, float *vs, int k, const int64_t *dims,
                    const float *code_m, const float *mid_m, const float *code_v,
                    const float *mid_v, float w, float beta2, float w2, float eps, float wd,
                    float decay, int l2, int maximize, float step_size, float bc2_sqrt) {
    hp_t h = {w, beta2, w2, eps, wd, decay, step_size, bc2_sqrt, l2, maximize, w < 0.5f};
    int64_t tot = 0, R = 1;
    for (int j = 0; j < k; j++) tot += dims[j];
    for (int j = 1; j < k; j++) R *= dims[j];
    int64_t d2[2] = {k ? dims[0] : 0, R}, t2 = k > 2 ? d2[0] + R : 0;
    float *buf = (float *)malloc(sizeof(float) * (3 * block + tot + 3 * t2) + 64);
    uint8_t *tmp = (uint8_t *)malloc(block + 64);
    if (!buf || !tmp) { free(buf); free(tmp); return -1; }   /* nothing written */
    float *bm = buf, *bv = buf + block, *sc = buf + 2 * block;
    uint32_t *nmax = (uint32_t *)(buf + 3 * block);
    const float *S_old = vs, *S_new = (const float *)nmax;   /* two axes: the vectors as they are */
    uint32_t *M2 = nmax;
    if (k > 2) {
        float *so = buf + 3 * block + tot, *sn = so + t2;
        M2 = (uint32_t *)(sn + t2);
        memcpy(so, vs, sizeof(float) * d2[0]);
        trail_table(vs, k, dims, so + d2[0]);
        S_old = so;
        S_new = sn;
    }
    if (k) {                                   /* pass 1: the new per-axis maxima of v */
        for (int64_t j = 0; j < (k > 2 ? t2 : tot); j++) M2[j] = 0;
        for (int64_t b0 = 0; b0 < n; b0 += block) {
            int64_t len = b0 + block <= n ? block : n - b0;
            scales(S_old, 2, d2, b0, len, sc);
            decode(cv, b0, len, code_v, 1.0f, bv);
            for (int64_t i = 0; i < len; i++) { bv[i] *= sc[i]; bm[i] = 0.0f; }
            update(&h, p + b0, g + b0, bm, bv, len, 0);              /* p only read */
            maxima(M2, 2, d2, b0, len, bv);
        }
        if (k > 2) {                           /* back to per-axis maxima, and their table */
            memcpy(nmax, M2, sizeof(uint32_t) * d2[0]);
            trail_reduce(M2 + d2[0], k, dims, nmax);
            float *sn = (float *)S_new;
            memcpy(sn, nmax, sizeof(float) * d2[0]);
            trail_table((const float *)nmax, k, dims, sn + d2[0]);
        }
    }
    for (int64_t b0 = 0, bi = 0; b0 < n; b0 += block, bi++) {   /* pass 2 (or the only one) */
        int64_t len = b0 + block <= n ? block : n - b0;
        decode(cm, b0, len, code_m, am[bi], bm);
        if (k) {
            scales(S_old, 2, d2, b0, len, sc);
            decode(cv, b0, len, code_v, 1.0f, bv);
            for (int64_t i = 0; i < len; i++) bv[i] *= sc[i];
        } else {
            decode(cv, b0, len, code_v, vs[bi], bv);
        }
        update(&h, p + b0, g + b0, bm, bv, len, 1);
        am[bi] = absmax(bm, len);
        encode(bm, NULL, am[bi], len, mid_m, tmp, cm, b0);
        if (k) {
            scales(S_new, 2, d2, b0, len, sc);
            encode(bv, sc, 0.0f, len, mid_v, tmp, cv, b0);
        } else {
            vs[bi] = absmax(bv, len);
            encode(bv, NULL, vs[bi], len, mid_v, tmp, cv, b0);
        }
    }
    if (k) memcpy(vs, nmax, sizeof(float) * tot);
    free(buf);
    free(tmp);
    return 0;
}
"""

FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math",
         "-fno-strict-aliasing", "-shared", "-fPIC"]   # maxima kept as bits, read as floats


def _build() -> Path:
    cc = _cbuild.compiler()
    if not cc:
        raise RuntimeError("no C compiler found (set $CC or install gcc)")
    name = _cbuild.lib_name("adam4bit", SOURCE, FLAGS, cc, _cbuild.cpu_id())
    flag_sets = (FLAGS, [f for f in FLAGS if f != "-march=native"])
    return _cbuild.build(name, SOURCE, flag_sets, cc, warnings.warn)


def _declare(lib) -> None:
    P, L, F, N = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    lib.memlab_adam4bit.argtypes = [P, P, L, L, P, P, P, P, N, P, P, P, P, P,
                                    F, F, F, F, F, F, N, N, F, F]
    lib.memlab_adam4bit.restype = ctypes.c_int


_LIBRARY = _cbuild.LazyLibrary(lambda: _build(), lambda lib: _declare(lib),
                               "C kernel for the 4-bit Adam step", "the torch-op step")


def library():
    """The loaded library, or None (no compiler, build failed, or MEMLAB_CPU_KERNEL=0)."""
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
                  maximize: bool) -> None:
    """:func:`memlab.optim4bit._adam4bit_step` for tensors :func:`eligible` accepts (real)."""
    from memlab._cpu_kernels import _bump
    from memlab.quant4 import _dims, _table
    lib = library()
    code_m, mid_m = _table(True, p.device)
    code_v, mid_v = _table(False, p.device)
    rank1 = exp_avg_sq.rank1
    dims = torch.tensor(_dims(p.shape) if rank1 else [0], dtype=torch.int64)
    l2 = weight_decay != 0 and not decoupled
    decay = 1 - lr * weight_decay if (decoupled and weight_decay != 0) else 1.0
    rc = lib.memlab_adam4bit(
        p.data_ptr(), grad.data_ptr(), p.numel(), exp_avg.block_size,
        exp_avg.codes.data_ptr(), exp_avg.scale.data_ptr(), exp_avg_sq.codes.data_ptr(),
        exp_avg_sq.scale.data_ptr(), len(_dims(p.shape)) if rank1 else 0, dims.data_ptr(),
        code_m.data_ptr(), mid_m.data_ptr(), code_v.data_ptr(), mid_v.data_ptr(),
        1 - beta1, beta2, 1 - beta2, eps, weight_decay, decay, int(l2), int(maximize),
        lr / (1 - beta1 ** step), (1 - beta2 ** step) ** 0.5)
    if rc != 0:
        raise MemoryError("memlab: the 4-bit step could not allocate its block buffers")
    _bump(p, exp_avg.codes, exp_avg.scale, exp_avg_sq.codes, exp_avg_sq.scale)
