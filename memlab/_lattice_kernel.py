"""C kernel for :func:`memlab._lattice.chunk_loss` on CPU float32 / float64 logits.

Why: the torch code runs ~15 small ops per lattice column and ~6 passes over the logits (the
normaliser's temporaries, sub, exp, scatter); on one core that is ~3x the time of the joiner's
last matmul. In C the chunk costs two sweeps of the logits, each row of V values read while it is
in L1: (1) max, sum of exp -> lognorm, and the gathers log p(blank), log p(y_{u+1}); (3) the
gradient ``exp(x - lognorm) * occ`` minus the two one-hot terms, written over the logits (or into
``out``). Between them (2) the alpha/beta recursions and the per-cell occupancies on the
T x (U+1) lattice, in float64. float32 uses a vectorisable exp (range reduction + degree-6
polynomial, relative error < 3e-7); float64 uses libm. Rows are split across
``torch.get_num_threads()`` Python threads (ctypes releases the GIL).

Scratch (lognorm, both log-probabilities, alpha, beta: 5 float64 per cell, ~2% of the logits
at V = 512) is allocated as torch tensors, so :class:`memlab.memory.MemoryMeter` sees it.

Building and loading follow :mod:`memlab._cpu_kernels`: ``cc -O3 -march=native`` into the private
cache ``$MEMLAB_CACHE``/kernels (:mod:`memlab._private`: ours, 0700, no ancestor others can
write to), keyed by a hash of source, flags, compiler and CPU; a cached library is loaded only if
it is ours and its sha256 matches the one recorded when it was built; an unsafe cache means a
fresh private temporary folder. No compiler, a failed build or ``MEMLAB_CPU_KERNEL=0``: the torch
path is used (a warning says why, once).
"""

from __future__ import annotations

import ctypes
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import torch

from memlab import _cbuild

SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>

#define LANES 16

/* Gradients far off a sample's likely paths are below float's normal range; on x86 such
   subnormal results cost ~100 cycles each (3x the whole pass at T=200, U=40, V=512). The
   gradient passes flush them to zero (MXCSR FTZ + DAZ for the call, restored after), and float32
   gradient rows whose weight (occupancy) is at most TINY_F32 are written as zeros: every value
   in them is below 1e-30, and downstream products with them would be subnormal too (the Python
   constant TINY_F32 below is the same rule for the lattice's float32 gradients) */
#define TINY_F32 1e-30
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#define FLUSH_BEGIN unsigned int csr_saved_ = _mm_getcsr(); _mm_setcsr(csr_saved_ | 0x8040u);
#define FLUSH_END _mm_setcsr(csr_saved_);
#else
#define FLUSH_BEGIN
#define FLUSH_END
#endif

/* e^x for float lanes: x = n ln2 + r, |r| <= ln2/2; 2^n from the exponent bits */
static inline float exp_lane(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;   /* round to nearest */
    float r = x - n * 0.693145751953125f;
    r = r - n * 1.428606765330187045e-06f;
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float s;
    memcpy(&s, &bits, 4);
    return p * s;
}

static double lse_f32(const float *x, int64_t V) {
    float m[LANES], s[LANES];
    int64_t v = 0;
    for (int j = 0; j < LANES; j++) m[j] = -INFINITY, s[j] = 0.0f;
    for (; v + LANES <= V; v += LANES)
        for (int j = 0; j < LANES; j++) m[j] = x[v + j] > m[j] ? x[v + j] : m[j];
    float mx = -INFINITY;
    for (int j = 0; j < LANES; j++) mx = m[j] > mx ? m[j] : mx;
    for (int64_t k = v; k < V; k++) mx = x[k] > mx ? x[k] : mx;
    if (mx == -INFINITY || mx != mx || mx == INFINITY) return mx;
    for (v = 0; v + LANES <= V; v += LANES)
        for (int j = 0; j < LANES; j++) s[j] += exp_lane(x[v + j] - mx);
    double tot = 0.0;
    for (int j = 0; j < LANES; j++) tot += s[j];
    for (int64_t k = v; k < V; k++) tot += exp_lane(x[k] - mx);
    return (double)mx + log(tot);
}

static double lse_f64(const double *x, int64_t V) {
    double mx = -INFINITY, tot = 0.0;
    for (int64_t v = 0; v < V; v++) mx = x[v] > mx ? x[v] : mx;
    if (mx == -INFINITY || mx != mx || mx == INFINITY) return mx;
    for (int64_t v = 0; v < V; v++) tot += exp(x[v] - mx);
    return mx + log(tot);
}

/* (1) rows r = n T + t in [r0, r1): lognorm and the two log-probabilities of every cell */
#define PASS1(NAME, R, LSE)                                                                    \
void NAME(const R *x, const int64_t *tgt, const int64_t *tlen, const int64_t *ulen, int64_t T, \
          int64_t U1, int64_t V, int64_t blank, int64_t r0, int64_t r1, double *ln,          \
          double *lpb, double *lpe) {                                                         \
    for (int64_t r = r0; r < r1; r++) {                                                       \
        int64_t n = r / T, t = r % T;                                                         \
        for (int64_t u = 0; u < U1; u++) {                                                    \
            int64_t c = r * U1 + u;                                                           \
            if (t >= tlen[n] || u > ulen[n]) {                                                \
                ln[c] = 0.0; lpb[c] = lpe[c] = -INFINITY; continue;                           \
            }                                                                                 \
            const R *row = x + c * V;                                                         \
            double l = LSE(row, V);                                                           \
            ln[c] = l;                                                                        \
            lpb[c] = (double)row[blank] - l;                                                  \
            lpe[c] = u < ulen[n] ? (double)row[tgt[n * (U1 - 1) + u]] - l : -INFINITY;        \
        }                                                                                     \
    }                                                                                         \
}
PASS1(memlab_rnnt_pass1_f32, float, lse_f32)
PASS1(memlab_rnnt_pass1_f64, double, lse_f64)

static inline double lae(double a, double b) {
    double m = a > b ? a : b;
    if (m == -INFINITY) return -INFINITY;
    return m + log1p(exp(-fabs(a - b)));
}

/* (2) samples [n0, n1): alpha, log Z (costs = -log Z); with weights also beta and, in place of
   alpha / lpb / lpe, the weighted occupancy and blank / emit transition probabilities */
void memlab_rnnt_lattice(int64_t T, int64_t U1, const int64_t *tlen, const int64_t *ulen,
                         int64_t n0, int64_t n1, double *lpb, double *lpe, double *al,
                         double *be, const double *weights, double *costs) {
    for (int64_t n = n0; n < n1; n++) {
        int64_t Tn = tlen[n], Un = ulen[n], o = n * T * U1;
        double *A = al + o, *B = be + o, *PB = lpb + o, *PE = lpe + o;
#define I(t, u) ((t) * U1 + (u))
        for (int64_t t = 0; t < Tn; t++)
            for (int64_t u = 0; u <= Un; u++) {
                if (t == 0 && u == 0) { A[0] = 0.0; continue; }
                double a = t > 0 ? A[I(t - 1, u)] + PB[I(t - 1, u)] : -INFINITY;
                double b = u > 0 ? A[I(t, u - 1)] + PE[I(t, u - 1)] : -INFINITY;
                A[I(t, u)] = lae(a, b);
            }
        double logz = A[I(Tn - 1, Un)] + PB[I(Tn - 1, Un)];
        costs[n] = -logz;
        if (!weights) continue;
        for (int64_t t = Tn - 1; t >= 0; t--)
            for (int64_t u = Un; u >= 0; u--) {
                double a = t + 1 < Tn ? B[I(t + 1, u)] + PB[I(t, u)]
                                      : (u == Un ? PB[I(t, u)] : -INFINITY);
                double b = u < Un ? B[I(t, u + 1)] + PE[I(t, u)] : -INFINITY;
                B[I(t, u)] = lae(a, b);
            }
        double w = weights[n];
        for (int64_t t = 0; t < Tn; t++)
            for (int64_t u = 0; u <= Un; u++) {
                double after = t + 1 < Tn ? B[I(t + 1, u)] : (u == Un ? 0.0 : -INFINITY);
                double tb = exp(A[I(t, u)] + PB[I(t, u)] + after - logz);
                double te = u < Un ? exp(A[I(t, u)] + PE[I(t, u)] + B[I(t, u + 1)] - logz) : 0.0;
                A[I(t, u)] = w * (tb + te);
                PB[I(t, u)] = w * tb;
                PE[I(t, u)] = w * te;
            }
#undef I
    }
}

/* (3) rows [r0, r1): out = occ * softmax - tb [blank] - te [y_{u+1}]; out may alias x */
#define PASS3(NAME, R, EXPR, TINY)                                                               \
void NAME(const R *x, R *out, const int64_t *tgt, const int64_t *tlen, const int64_t *ulen,   \
          int64_t T, int64_t U1, int64_t V, int64_t blank, int64_t r0, int64_t r1,            \
          const double *ln, const double *occ, const double *tb, const double *te) {          \
    FLUSH_BEGIN                                                                               \
    for (int64_t r = r0; r < r1; r++) {                                                       \
        int64_t n = r / T, t = r % T;                                                         \
        for (int64_t u = 0; u < U1; u++) {                                                    \
            int64_t c = r * U1 + u;                                                           \
            const R *row = x + c * V;                                                         \
            R *o = out + c * V;                                                               \
            if (t >= tlen[n] || u > ulen[n] || fabs(occ[c]) <= TINY) {                         \
                memset(o, 0, sizeof(R) * V); continue;                                        \
            }                                                                                 \
            double l = ln[c], k = occ[c];                                                     \
            int64_t y = u < ulen[n] ? tgt[n * (U1 - 1) + u] : -1;                             \
            double gb = exp((double)row[blank] - l) * k - tb[c];                              \
            double gy = y >= 0 ? exp((double)row[y] - l) * k - te[c] : 0.0;                  \
            R lr = (R)l, kr = (R)k;                                                           \
            if (o == row) for (int64_t v = 0; v < V; v++) o[v] = EXPR(o[v] - lr) * kr;        \
            else for (int64_t v = 0; v < V; v++) o[v] = EXPR(row[v] - lr) * kr;               \
            o[blank] = (R)gb;                                                                 \
            if (y >= 0) o[y] = (R)gy;                                                         \
        }                                                                                     \
    }                                                                                         \
    FLUSH_END                                                                                 \
}
PASS3(memlab_rnnt_pass3_f32, float, exp_lane, TINY_F32)
PASS3(memlab_rnnt_pass3_f64, double, exp, 0.0)

/* Rows of a pruned band (memlab.pruned): rows [r0, r1) of V logits each, with their own symbol
   sym[r] (the next label of the row's cell). (1) lognorm and log p(blank), log p(sym). */
#define BAND1(NAME, R, LSE)                                                                    \
void NAME(const R *x, const int64_t *sym, int64_t V, int64_t blank, int64_t r0, int64_t r1,   \
          double *ln, double *lpb, double *lpe) {                                             \
    for (int64_t r = r0; r < r1; r++) {                                                       \
        const R *row = x + r * V;                                                             \
        double l = LSE(row, V);                                                               \
        ln[r] = l;                                                                            \
        lpb[r] = (double)row[blank] - l;                                                      \
        lpe[r] = (double)row[sym[r]] - l;                                                     \
    }                                                                                         \
}
BAND1(memlab_band_pass1_f32, float, lse_f32)
BAND1(memlab_band_pass1_f64, double, lse_f64)

/* (3) d loss / d logits of band rows [r0, r1): gb, ge are d loss / d log p(blank), d log p(sym):
   out = -(gb + ge) softmax + gb [blank] + ge [sym]; out may alias x */
#define BAND3(NAME, R, EXPR, TINY)                                                               \
void NAME(const R *x, R *out, const int64_t *sym, int64_t V, int64_t blank, int64_t r0,       \
          int64_t r1, const double *ln, const double *gb, const double *ge) {                 \
    FLUSH_BEGIN                                                                               \
    for (int64_t r = r0; r < r1; r++) {                                                       \
        const R *row = x + r * V;                                                             \
        R *o = out + r * V;                                                                   \
        double k = -(gb[r] + ge[r]);                                                          \
        if (fabs(gb[r]) <= TINY && fabs(ge[r]) <= TINY) {                                    \
            memset(o, 0, sizeof(R) * V); continue;                                            \
        }                                                                                     \
        double l = ln[r];                                                                     \
        int64_t y = sym[r];                                                                   \
        double pb = exp((double)row[blank] - l), py = exp((double)row[y] - l);                \
        R lr = (R)l, kr = (R)k;                                                               \
        if (o == row) for (int64_t v = 0; v < V; v++) o[v] = EXPR(o[v] - lr) * kr;            \
        else for (int64_t v = 0; v < V; v++) o[v] = EXPR(row[v] - lr) * kr;                   \
        if (y == blank) o[blank] = (R)(pb * k + gb[r] + ge[r]);                               \
        else { o[blank] = (R)(pb * k + gb[r]); o[y] = (R)(py * k + ge[r]); }                  \
    }                                                                                         \
    FLUSH_END                                                                                 \
}
BAND3(memlab_band_pass3_f32, float, exp_lane, TINY_F32)
BAND3(memlab_band_pass3_f64, double, exp, 0.0)
"""

FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC"]
MIN_ROWS_PER_THREAD = 8           # rows of (U+1) x V values: below this, one thread

_lock = threading.Lock()
_pool: Optional[ThreadPoolExecutor] = None
_pool_size = 0


def _build() -> Path:
    """Path of the lattice library this process may load (memlab._cbuild: private cache, sha256
    checked, CPU in the key; a private temporary folder when the cache is unsafe)."""
    cc = _cbuild.compiler()
    if not cc:
        raise RuntimeError("no C compiler found (set $CC or install gcc)")
    name = _cbuild.lib_name("rnnt", SOURCE, FLAGS, cc, _cbuild.cpu_id())
    flag_sets = (FLAGS, [f for f in FLAGS if f != "-march=native"])
    return _cbuild.build(name, SOURCE, flag_sets, cc, warnings.warn)


def _declare(lib) -> None:
    P, I = ctypes.c_void_p, ctypes.c_int64
    for dt in ("f32", "f64"):
        f = getattr(lib, f"memlab_rnnt_pass1_{dt}")
        f.argtypes, f.restype = [P, P, P, P, I, I, I, I, I, I, P, P, P], None
        f = getattr(lib, f"memlab_rnnt_pass3_{dt}")
        f.argtypes, f.restype = [P, P, P, P, P, I, I, I, I, I, I, P, P, P, P], None
    lib.memlab_rnnt_lattice.argtypes = [I, I, P, P, I, I, P, P, P, P, P, P]
    lib.memlab_rnnt_lattice.restype = None
    for dt in ("f32", "f64"):
        f = getattr(lib, f"memlab_band_pass1_{dt}")
        f.argtypes, f.restype = [P, P, I, I, I, I, P, P, P], None
        f = getattr(lib, f"memlab_band_pass3_{dt}")
        f.argtypes, f.restype = [P, P, P, I, I, I, I, P, P, P], None


_LIBRARY = _cbuild.LazyLibrary(lambda: _build(), lambda lib: _declare(lib),
                               "C kernel for the sample-wise transducer loss", "the torch lattice code")


def library():
    """The loaded library, or None (no compiler, build failed, or MEMLAB_CPU_KERNEL=0)."""
    return _LIBRARY.get()


def available() -> bool:
    return library() is not None


def _split(fn, total: int, min_per: int, before, after) -> None:
    """``fn(*before, i0, i1, *after)`` over [0, total), split across threads."""
    global _pool, _pool_size
    threads = min(torch.get_num_threads(), max(1, total // min_per))
    if threads <= 1:
        fn(*before, 0, total, *after)
        return
    if _pool is None or _pool_size < threads:
        with _lock:
            if _pool is None or _pool_size < threads:
                _pool, _pool_size = ThreadPoolExecutor(threads, "memlab-rnnt"), threads
    edges = [total * k // threads for k in range(threads + 1)]
    futs = [_pool.submit(fn, *before, edges[k], edges[k + 1], *after) for k in range(1, threads)]
    fn(*before, edges[0], edges[1], *after)
    for f in futs:
        f.result()


def _real(*ts) -> bool:
    """No fake tensors (memlab.memory.estimate) among ts (None skipped): pointers may be taken."""
    return all(type(t) is torch.Tensor for t in ts if t is not None)


def _dense(t: torch.Tensor, dtype: torch.dtype, shape) -> bool:
    """A CPU tensor of that dtype and shape whose storage holds its bytes contiguously (real, or
    fake under estimate: chunk_loss takes pointers of real tensors only)."""
    from memlab._lattice import _plain
    return (_plain(t) and t.device.type == "cpu" and t.dtype == dtype
            and tuple(t.shape) == tuple(shape) and t.is_contiguous()
            and t.untyped_storage().nbytes() >= (t.storage_offset() + t.numel()) * t.element_size())


def chunk_loss(logits, tgt, t_len, u_len, blank: int, weights=None, out=None) -> torch.Tensor:
    """:func:`memlab._lattice.chunk_loss` in C; ``tgt`` already has padding set to ``blank``.
    Every tensor is checked before a raw pointer is taken (ValueError naming it)."""
    lib = library()
    N, T, U1, V = logits.shape
    dt = {torch.float32: "f32", torch.float64: "f64"}.get(logits.dtype)
    if dt is None or not _dense(logits, logits.dtype, (N, T, U1, V)):
        raise ValueError(f"logits must be a contiguous float32/float64 CPU tensor, got "
                         f"{logits.dtype} {tuple(logits.shape)}")
    if out is not None and not _dense(out, logits.dtype, logits.shape):
        raise ValueError(f"out must be a contiguous {logits.dtype} CPU tensor of shape "
                         f"{tuple(logits.shape)}")
    tgt = tgt.to(torch.int64).contiguous()
    t_len = t_len.to(torch.int64).contiguous()
    u_len = u_len.to(torch.int64).contiguous()
    if not (_dense(tgt, torch.int64, (N, U1 - 1)) and _dense(t_len, torch.int64, (N,))
            and _dense(u_len, torch.int64, (N,))):
        raise ValueError("targets (N, U) and lengths (N,) must be CPU integer tensors")
    if not 0 <= blank < V:
        raise ValueError(f"blank must lie in [0, V={V}), got {blank}")
    from memlab.memory import host_values
    known = host_values(t_len, u_len)            # None: fake lengths without values (estimate)
    if N and known is not None and (
            int(known[0].min()) < 1 or int(known[0].max()) > T or int(known[1].min()) < 0
            or int(known[1].max()) > U1 - 1):
        raise ValueError(f"lengths must lie in [1, T={T}] and [0, U={U1 - 1}]")
    known_tgt = host_values(tgt)
    if tgt.numel() and known_tgt is not None and (int(known_tgt[0].min()) < 0
                                                  or int(known_tgt[0].max()) >= V):
        raise ValueError(f"targets must lie in [0, V={V})")
    scratch = torch.empty(5, N, T, U1, dtype=torch.float64)    # lognorm, lpb, lpe, alpha, beta
    ln, lpb, lpe, al, be = (scratch[i] for i in range(5))
    costs = torch.empty(N, dtype=torch.float64)
    w = None
    if weights is not None:
        w = weights.detach().to(device="cpu", dtype=torch.float64).contiguous()
        if not _dense(w, torch.float64, (N,)):
            raise ValueError(f"weights must have shape ({N},), got {tuple(weights.shape)}")
    if not _real(logits, out, tgt, t_len, u_len, w):
        # fake tensors (memlab.memory.estimate): the allocations above are the kernel's; the
        # values are unknown, so nothing is computed (out keeps its shape, costs are fake)
        return costs
    p = lambda t: t.data_ptr()                                                 # noqa: E731
    lens = (p(tgt), p(t_len), p(u_len), T, U1, V, blank)
    _split(getattr(lib, f"memlab_rnnt_pass1_{dt}"), N * T, MIN_ROWS_PER_THREAD,
           (p(logits), *lens), (p(ln), p(lpb), p(lpe)))
    _split(lib.memlab_rnnt_lattice, N, 1, (T, U1, p(t_len), p(u_len)),
           (p(lpb), p(lpe), p(al), p(be), None if w is None else p(w), p(costs)))
    if w is not None:
        _split(getattr(lib, f"memlab_rnnt_pass3_{dt}"), N * T, MIN_ROWS_PER_THREAD,
               (p(logits), p(out), *lens), (p(ln), p(al), p(lpb), p(lpe)))
        inc = getattr(torch.autograd.graph, "increment_version", None)
        if inc is not None:
            inc(out)                  # written through a pointer: tell autograd it changed
    return costs


# ----------------------------------------------------------------------------------------------
# pruned band rows and the bare lattice (memlab.pruned)

MIN_BAND_ROWS_PER_THREAD = 256     # rows of V values
TINY_F32 = 1e-30                   # as the C source's TINY_F32: float32 gradients at most this are 0


def band_usable(logits: torch.Tensor) -> bool:
    """The band kernels take these logits: real, contiguous float32/float64 CPU, library built."""
    return (logits.dtype in (torch.float32, torch.float64) and logits.dim() == 4
            and _real(logits) and _dense(logits, logits.dtype, logits.shape) and available())


def band_forward(logits: torch.Tensor, sym: torch.Tensor, blank: int):
    """logits (N, T, S, V), sym (N, T, S) int64 -> float64 (lognorm, log p(blank), log p(sym)),
    each (N, T, S); one read of the logits (every row in L1 while it is reduced)."""
    N, T, S, V = logits.shape
    sym = sym.reshape(N, T, S).to(torch.int64).contiguous()
    if not 0 <= blank < V:
        raise ValueError(f"blank must lie in [0, V={V}), got {blank}")
    if sym.numel() and (int(sym.min()) < 0 or int(sym.max()) >= V):
        raise ValueError(f"sym must lie in [0, V={V})")
    out = torch.empty(3, N, T, S, dtype=torch.float64)
    dt = "f32" if logits.dtype == torch.float32 else "f64"
    p = lambda t: t.data_ptr()                                                 # noqa: E731
    _split(getattr(library(), f"memlab_band_pass1_{dt}"), N * T * S, MIN_BAND_ROWS_PER_THREAD,
           (p(logits), p(sym), V, blank), (p(out[0]), p(out[1]), p(out[2])))
    return out[0], out[1], out[2]


def band_backward(logits: torch.Tensor, sym: torch.Tensor, blank: int, lognorm: torch.Tensor,
                  g_blank: torch.Tensor, g_emit: torch.Tensor) -> torch.Tensor:
    """d loss / d logits (N, T, S, V) of :func:`band_forward`'s outputs, given their gradients
    g_blank, g_emit (N, T, S): -(g_blank + g_emit) softmax + g_blank [blank] + g_emit [sym],
    written in one sweep into a new tensor of the logits' dtype."""
    N, T, S, V = logits.shape
    sym = sym.reshape(N, T, S).to(torch.int64).contiguous()
    gb = g_blank.detach().to(torch.float64).contiguous()
    ge = g_emit.detach().to(torch.float64).contiguous()
    ln = lognorm.to(torch.float64).contiguous()
    for name, t in (("lognorm", ln), ("g_blank", gb), ("g_emit", ge)):
        if not _dense(t, torch.float64, (N, T, S)):
            raise ValueError(f"{name} must have shape ({N}, {T}, {S}), got {tuple(t.shape)}")
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    dt = "f32" if logits.dtype == torch.float32 else "f64"
    p = lambda t: t.data_ptr()                                                 # noqa: E731
    _split(getattr(library(), f"memlab_band_pass3_{dt}"), N * T * S, MIN_BAND_ROWS_PER_THREAD,
           (p(logits), p(grad), p(sym), V, blank), (p(ln), p(gb), p(ge)))
    return grad


def lattice(px: torch.Tensor, py: torch.Tensor, enc_lengths: torch.Tensor,
            target_lengths: torch.Tensor):
    """The alpha-beta pass of a bare lattice in C, in float64: px (B, T, U), py (B, T, U+1)
    log-probs (-inf: no arc) -> (losses (B,), d loss / d px, d loss / d py) in px's dtype, zero
    off each sample's lattice; below float64, gradients at most TINY_F32 are zero (float32
    subnormals make every later op on them several times slower on x86). None when the kernel
    cannot take them (fake tensors, no library)."""
    if not (_real(px, py) and available() and px.device.type == "cpu"
            and py.device.type == "cpu"):
        return None
    B, T, U1 = py.shape
    if tuple(px.shape) != (B, T, U1 - 1):
        raise ValueError(f"px must have shape ({B}, {T}, {U1 - 1}), got {tuple(px.shape)}")
    t_len = enc_lengths.detach().to("cpu", torch.int64).contiguous()
    u_len = target_lengths.detach().to("cpu", torch.int64).contiguous()
    if B and (int(t_len.min()) < 1 or int(t_len.max()) > T or int(u_len.min()) < 0
              or int(u_len.max()) > U1 - 1):
        raise ValueError(f"lengths must lie in [1, T={T}] and [0, U={U1 - 1}]")
    lpb = py.detach().to(torch.float64).clone(memory_format=torch.contiguous_format)
    lpe = torch.full((B, T, U1), -float("inf"), dtype=torch.float64)
    lpe[:, :, :U1 - 1] = px.detach()
    al = torch.empty(B, T, U1, dtype=torch.float64)
    be = torch.empty(B, T, U1, dtype=torch.float64)
    w = torch.ones(B, dtype=torch.float64)
    costs = torch.empty(B, dtype=torch.float64)
    p = lambda t: t.data_ptr()                                                 # noqa: E731
    _split(library().memlab_rnnt_lattice, B, 1, (T, U1, p(t_len), p(u_len)),
           (p(lpb), p(lpe), p(al), p(be), p(w), p(costs)))
    # lpb / lpe now hold the blank / emit arcs' occupations on each sample's lattice; cells
    # outside it (t >= T_b or u > U_b) were not written
    t = torch.arange(T)[None, :, None]
    u = torch.arange(U1)[None, None, :]
    on = (t < t_len[:, None, None]) & (u <= u_len[:, None, None])               # (B, T, U+1)
    gy = torch.where(on, lpb.neg_(), 0.0)
    gx = torch.where(on, lpe.neg_(), 0.0)[:, :, :U1 - 1]
    if px.dtype == torch.float64:
        return costs, gx, gy
    flush = lambda g: g.masked_fill_(g.abs() <= TINY_F32, 0.0).to(px.dtype)  # noqa: E731
    return costs.to(px.dtype), flush(gx), flush(gy)
