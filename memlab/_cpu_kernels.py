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
A NaN anywhere in a block makes that block's absmax NaN, like ``torch.amax``. Splitting a tensor
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
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from memlab._private import check_private_file, private_dir, user_cache_root

__all__ = ["library", "available", "sgd8bit", "adam8bit"]

SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef union { float f; uint32_t u; } pun;
static inline uint32_t bits_of(float x) { pun c; c.f = x; return c.u; }
static inline float float_of(uint32_t b) { pun c; c.u = b; return c.f; }

/* max |x| over a block; NaN if any element is NaN (as torch.amax): for non-negative floats the
   bit patterns order like the values, and every NaN pattern (sign cleared) lies above inf's */
static float block_absmax(const float *x, int64_t len) {
    uint32_t mx = 0;
    for (int64_t i = 0; i < len; i++) {
        uint32_t b = bits_of(x[i]) & 0x7fffffffu;
        mx = b > mx ? b : mx;
    }
    return float_of(mx);
}

/* x / scale rounded to the nearest code: 16-bit table of the lower candidate (sign, exponent,
   7 mantissa bits) plus the one midpoint that can fall in that range. keep: the index of the
   zero code that a positive value must not get (it gets the next code up), or -1 for none */
static void encode_block(const float *x, int64_t len, float amax, uint8_t *codes,
                         const int32_t *lut, const float *lut_mid, float *tmp, int32_t keep) {
    float scale = (amax == 0.0f) ? 1.0f : amax;
    int32_t *idx = (int32_t *)tmp;                      /* 32-bit lanes: gathers vectorize */
    for (int64_t i = 0; i < len; i++) {
        float xn = x[i] / scale;
        int32_t key = ((int32_t)bits_of(xn) >> 16) + 32768;     /* 0..65535 */
        int32_t c = lut[key] + (xn > lut_mid[key]);
        idx[i] = c + ((c == keep) & (xn > 0.0f));
    }
    for (int64_t i = 0; i < len; i++) codes[i] = (uint8_t)idx[i];
}

/* SGD (+momentum) as torch.optim.SGD; blocks [b0, b1) of a flat tensor of n elements. */
int memlab_sgd8bit(float *p, const float *g, uint8_t *codes, float *absmax, int64_t n,
                    int64_t block, int64_t b0, int64_t b1, const float *restrict code,
                    const int32_t *lut, const float *lut_mid, float lr, float momentum,
                    float keep, float wd, int nesterov, int maximize, int first) {
    float *buf = (float *)malloc(sizeof(float) * 2 * block), *tmp = buf + block;
    if (!buf) return -1;                                /* nothing written: the caller raises */
    float sign = maximize ? -1.0f : 1.0f;
    for (int64_t b = b0; b < b1; b++) {
        int64_t s = b * block, len = (s + block <= n) ? block : n - s;
        float am = absmax[b];
        float *restrict ps = p + s;
        const float *restrict gs = g + s;
        const uint8_t *restrict cs = codes + s;
        for (int64_t i = 0; i < len; i++) {
            float gi = sign * gs[i];
            if (wd != 0.0f) gi = fmaf(ps[i], wd, gi);                 /* g.add(p, alpha=wd) */
            float m = first ? gi : fmaf(gi, keep, code[cs[i]] * am * momentum);
            float u = nesterov ? fmaf(m, momentum, gi) : m;
            ps[i] = fmaf(u, -lr, ps[i]);                              /* p.add_(u, alpha=-lr) */
            buf[i] = m;
        }
        float amax = block_absmax(buf, len);
        encode_block(buf, len, amax, codes + s, lut, lut_mid, tmp, -1);
        absmax[b] = amax;
    }
    free(buf);
    return 0;
}

/* Adam / AdamW as torch.optim; exp_avg signed map (cm, am_), exp_avg_sq unsigned (cv, av_). */
int memlab_adam8bit(float *p, const float *g, uint8_t *cm, float *am_, uint8_t *cv, float *av_,
                     int64_t n, int64_t block, int64_t b0, int64_t b1,
                     const float *restrict code_m, const int32_t *lut_m, const float *mid_m,
                     const float *restrict code_v, const int32_t *lut_v, const float *mid_v,
                     float w, float beta2, float w2, float eps, float wd, float decay,
                     int decoupled, int maximize, float step_size, float bc2_sqrt,
                     int32_t zero_v) {
    float *buf = (float *)malloc(sizeof(float) * 3 * block);
    if (!buf) return -1;                                /* nothing written: the caller raises */
    float *restrict bm = buf, *restrict bv = buf + block, *tmp = buf + 2 * block;
    float sign = maximize ? -1.0f : 1.0f;
    int l2 = !decoupled && wd != 0.0f;
    if (!(decoupled && wd != 0.0f)) decay = 1.0f;
    int lerp_low = w < 0.5f;
    for (int64_t b = b0; b < b1; b++) {
        int64_t s = b * block, len = (s + block <= n) ? block : n - s;
        float sm = am_[b], sv = av_[b];
        float *restrict ps = p + s;
        const float *restrict gs = g + s;
        const uint8_t *restrict cms = cm + s, *restrict cvs = cv + s;
        for (int64_t i = 0; i < len; i++) {              /* decode (gathers) */
            bm[i] = code_m[cms[i]] * sm;
            bv[i] = code_v[cvs[i]] * sv;
        }
        for (int64_t i = 0; i < len; i++) {              /* update (contiguous arithmetic) */
            float pk = ps[i] * decay;                     /* decay == 1 unless AdamW: exact */
            float g0 = sign * gs[i];
            float gi = l2 ? fmaf(pk, wd, g0) : g0;
            float m = bm[i], v = bv[i];
            float d = gi - m;                                 /* m.lerp_(g, w), as torch: */
            m = lerp_low ? fmaf(w, d, m) : fmaf(-d, 1.0f - w, gi);
            v = fmaf(w2 * gi, gi, v * beta2);                 /* v.mul_(b2).addcmul_(g, g, w2) */
            float denom = sqrtf(v) / bc2_sqrt + eps;
            ps[i] = pk + ((-step_size) * m) / denom;         /* p.addcdiv_(m, denom, -lr') */
            bm[i] = m;
            bv[i] = v;
        }
        float mmax = block_absmax(bm, len), vmax = block_absmax(bv, len);
        encode_block(bm, len, mmax, cm + s, lut_m, mid_m, tmp, -1);
        encode_block(bv, len, vmax, cv + s, lut_v, mid_v, tmp, zero_v);  /* v > 0 never 0 */
        am_[b] = mmax;
        av_[b] = vmax;
    }
    free(buf);
    return 0;
}
"""

FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC"]
MIN_PER_THREAD = 1 << 16          # elements: below this one thread is faster than handing off

_lock = threading.Lock()
_lib = None                       # ctypes.CDLL, or False once building failed
_pool: Optional[ThreadPoolExecutor] = None
_pool_size = 0


def _cache_dir() -> Path:
    return user_cache_root() / "kernels"


def _cpu_id() -> str:
    """What ``-march=native`` compiles for: the CPU model and its feature flags (Linux), else
    the platform's processor string, so a cache shared by two machines never hands one the
    other's instructions."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read(1 << 16)
        keep = [ln for ln in text.splitlines()
                if ln.split(":")[0].strip() in ("vendor_id", "model name", "flags", "Features",
                                                "CPU part", "isa")]
        return "\n".join(dict.fromkeys(keep))
    except OSError:
        return platform.machine() + platform.processor()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _compile(cc: str, folder: Path, name: str) -> Path:
    """Compile SOURCE into ``folder/name`` (atomically) and record its sha256 beside it."""
    out = folder / name
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        src, lib = Path(tmp) / "opt8bit.c", Path(tmp) / "opt8bit.so"
        src.write_text(SOURCE)
        for flags in (FLAGS, [f for f in FLAGS if f != "-march=native"]):  # e.g. older clang
            res = subprocess.run([cc, *flags, str(src), "-o", str(lib), "-lm"],
                                 capture_output=True, text=True, timeout=120)
            if res.returncode == 0:
                break
        if res.returncode != 0:
            raise RuntimeError(f"{cc} failed: {res.stderr.strip()[:500]}")
        os.chmod(lib, 0o700)
        sig = Path(tmp) / "sig"
        sig.write_text(_digest(lib))
        os.replace(lib, out)                       # atomic: another process may race us
        os.replace(sig, folder / (name + ".sha256"))
    return out


def _compiler() -> Optional[str]:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _lib_name(cc: str) -> str:
    """File name of the library: a hash of the source, flags, compiler, platform and CPU."""
    key = hashlib.sha256("\0".join([SOURCE, " ".join(FLAGS), cc, sys.platform,
                                     _cpu_id()]).encode()).hexdigest()[:16]
    return f"opt8bit-{key}.so"


def _build() -> Path:
    """Path of a kernel library this process may load: from the private cache when it is ours
    and unchanged since we built it, else freshly compiled (into the cache, or into a new
    private temporary folder when the cache cannot be used safely)."""
    cc = _compiler()
    if not cc:
        raise RuntimeError("no C compiler found (set $CC or install gcc)")
    name = _lib_name(cc)
    try:
        folder = private_dir(_cache_dir())
    except OSError as e:                           # read-only home, planted or shared folder
        global _scratch
        warnings.warn(f"memlab: not using the kernel cache ({e}); compiling into a private "
                      f"temporary folder for this process")
        _scratch = tempfile.TemporaryDirectory(prefix="memlab-kernels-")  # 0700, removed at exit
        return _compile(cc, Path(_scratch.name), name)
    lib, sig = folder / name, folder / (name + ".sha256")
    if lib.exists() or os.path.lexists(lib):
        ok = not check_private_file(lib) and sig.is_file() and not check_private_file(sig)
        if ok and sig.read_text().strip() == _digest(lib):
            return lib
        warnings.warn(f"memlab: {lib} is not the library memlab built (owner, mode or checksum "
                      f"differ); rebuilding it")
    return _compile(cc, folder, name)


_scratch = None                   # the per-process temporary folder, when the cache is unsafe


def _declare(lib) -> None:
    f32p, u8p, i64 = ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64
    f, i = ctypes.c_float, ctypes.c_int
    lib.memlab_sgd8bit.argtypes = [f32p, f32p, u8p, f32p, i64, i64, i64, i64, f32p, u8p, f32p,
                                   f, f, f, f, i, i, i]
    lib.memlab_sgd8bit.restype = ctypes.c_int
    lib.memlab_adam8bit.argtypes = [f32p, f32p, u8p, f32p, u8p, f32p, i64, i64, i64, i64,
                                    f32p, u8p, f32p, f32p, u8p, f32p,
                                    f, f, f, f, f, f, i, i, f, f, ctypes.c_int32]
    lib.memlab_adam8bit.restype = ctypes.c_int


def library():
    """The loaded kernel library, or None (no compiler, build failed, or MEMLAB_CPU_KERNEL=0)."""
    global _lib
    if os.environ.get("MEMLAB_CPU_KERNEL", "1") == "0":
        return None
    if _lib is None:
        with _lock:
            if _lib is None:
                try:
                    lib = ctypes.CDLL(str(_build()))
                    _declare(lib)
                    _lib = lib
                except Exception as e:  # no compiler, sandbox, ...: the eager path still works
                    warnings.warn(f"memlab: fused CPU kernel for the 8-bit optimizers unavailable "
                                  f"({e}); using the slower eager torch step")
                    _lib = False
    return _lib or None


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
                          "buffer (3 x block_size floats)")


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


def _book_ptrs(q) -> tuple:
    book = q._book
    return _ptr(book.code), _ptr(book.lut32), _ptr(book.lut_mid)


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
