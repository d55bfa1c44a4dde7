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
Quantize by multiplying with the reciprocal of the block's absmax (1 for an all-zero block;
dividing where that reciprocal overflows, as the eager path) and rounding to the nearest
code with the same 16-bit table + one comparison as :class:`memlab.quant._Codebook` (ties go to
the lower code); a positive second moment never gets the zero code (see :mod:`memlab.quant`).
A NaN anywhere in a block makes that block's absmax NaN, like ``torch.amax``.

With AVX-512 (F/BW/DQ/VBMI, from ``-march=native``) blocks run 16 lanes at a time: decode looks
up 64 codes per step in the value table's four byte planes (``vpermi2b``, no gather); the update
is the same operations in vector form; encode gathers one entry per value from a compact table
(:func:`enc_table`, ~12 KB per sign, L1-resident, equivalent to the 16-bit tables: checked on
every float in [-1, 1] of both maps). Blocks with a non-finite absmax, a length that is not a
multiple of 64/16, or maps the compact table cannot hold take the scalar code. A block's encode
is deferred into the next block's update loop (64 codes per 64 updated values; two buffers per
state): the encoder is arithmetic on cache-resident values and the update waits on memory, so
interleaved the core overlaps them (Intel Xeon, 1 thread, one 4.18 M tensor: Adam 6.9 -> 5.8 ms,
bits unchanged). Splitting a tensor across threads (whole blocks each) gives the same bits as
one thread.

A parameter group's 8-bit tensors go to C in one call (:func:`adam8bit_many`,
:func:`sgd8bit_many`: pointer arrays, the blocks of all tensors split over the threads), since
the Python side of one call per tensor cost ~90 us (a DF-ResNet233 has 225 such tensors).

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
called through ctypes with raw pointers (which releases the GIL). Large tensors are split, in
whole blocks, across ``torch.get_num_threads()`` threads of an OpenMP team (``-fopenmp``): the
library's libgomp.so.1 is the one torch has already loaded, so these are torch's own worker
threads, as with ``at::parallel_for``, and no second pool competes with torch's workers, which
spin for a while after each parallel op (with a pool of Python threads the second thread gained
nothing right after a torch op). Where that cannot hold (no OpenMP, a second OpenMP runtime
mapped) a pool of Python threads does the split (:func:`threading_mode`).
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
from memlab._opt8bit_source import SOURCE          # the C code
from memlab._private import user_cache_root

__all__ = ["library", "available", "sgd8bit", "adam8bit", "sgd8bit_many", "adam8bit_many"]

FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math",
         "-fopenmp", "-shared", "-fPIC"]
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
    flag_sets = (FLAGS, [f for f in FLAGS if f != "-march=native"],   # e.g. older clang
                 [f for f in FLAGS if f not in ("-march=native", "-fopenmp")])  # no libgomp
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
    for name in ("memlab_sgd8bit", "memlab_adam8bit"):        # (nt, ..., nb, ...): b0, b1 -> nb
        args = getattr(lib, name).argtypes
        getattr(lib, name + "_mt").argtypes = [i, *args[:6], i64, *args[8:]]
        getattr(lib, name + "_mt").restype = ctypes.c_int
    lib.memlab_sgd8bit_multi.argtypes = [i, i64, f32p, f32p, f32p, i64, f32p, u8p, f32p, u8p,
                                         f, f, f, f, i, i]
    lib.memlab_sgd8bit_multi.restype = ctypes.c_int
    lib.memlab_adam8bit_multi.argtypes = [i, i64, f32p, f32p, f32p, f32p, i64,
                                          f32p, u8p, f32p, u8p, f32p, u8p, f32p, u8p,
                                          f, f, f, f, f, f, i, i, ctypes.c_int32]
    lib.memlab_adam8bit_multi.restype = ctypes.c_int
    lib.memlab_openmp.argtypes = []
    lib.memlab_openmp.restype = ctypes.c_int


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
    if inc is None:
        return
    try:
        inc(list(tensors))                     # one call for all (torch >= 2.5 takes a list)
    except TypeError:
        for t in tensors:
            inc(t)


def _gomp_files() -> set:
    """The distinct libgomp files mapped into this process (Linux), or None where unknown."""
    try:
        with open("/proc/self/maps") as f:
            return {line.split()[-1] for line in f if "libgomp" in line.rsplit("/", 1)[-1]}
    except OSError:
        return None


_MODE: list = []


def threading_mode() -> Optional[str]:
    """How a step splits its blocks over ``torch.get_num_threads()`` threads: ``"openmp"``
    (an OpenMP team of the one libgomp torch already uses: torch's own worker threads, as
    ``at::parallel_for``), ``"python"`` (a pool of Python threads; the library was built without
    OpenMP, or loading it brought a second OpenMP runtime into the process), or None (no
    library)."""
    lib = library()
    if lib is None:
        return None
    if not _MODE:
        gomp = _gomp_files()
        _MODE.append("openmp" if lib.memlab_openmp() == 1 and gomp is not None and len(gomp) == 1
                     else "python")
    return _MODE[0]


def _run_blocks(name: str, nblocks: int, numel: int, args_before, args_after) -> None:
    """Call kernel ``name(*args_before, b0, b1, *args_after)`` over all blocks, split across
    threads (see :func:`threading_mode`)."""
    global _pool, _pool_size
    lib = library()
    fn = getattr(lib, name)
    threads = _threads_for(numel, nblocks)
    if threads <= 1:
        codes = [fn(*args_before, 0, nblocks, *args_after)]
        _raise_on_failure(codes)
        return
    if threading_mode() == "openmp":
        codes = [getattr(lib, name + "_mt")(threads, *args_before, nblocks, *args_after)]
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
        _check_book(name, q._book)


_BOOKS_OK: dict = {}     # id(codebook) -> (codebook, code, lut32, lut_mid) found valid


def _check_book(name: str, book) -> None:
    """The code book's tables are what the kernel reads (checked once per book and tables: the
    books are the process's own cached constants, never loaded from a checkpoint)."""
    seen = _BOOKS_OK.get(id(book))
    if (seen is not None and seen[0] is book and seen[1] is book.code and seen[2] is book.lut32
            and seen[3] is book.lut_mid):
        return
    if not (_fits(book.code, torch.float32, 256) and _fits(book.lut32, torch.int32, 65536)
            and _fits(book.lut_mid, torch.float32, 65536)):
        raise ValueError(f"{name}: the code book has no 16-bit lookup table")
    with _lock:
        if len(_BOOKS_OK) >= 64:
            _BOOKS_OK.clear()
        _BOOKS_OK[id(book)] = (book, book.code, book.lut32, book.lut_mid)


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
    _check_args(p, grad, [("momentum_buffer", buf)])
    n, block = p.numel(), buf.block_size
    nb = buf.absmax.numel()
    _run_blocks("memlab_sgd8bit", nb, n,
                (_ptr(p), _ptr(grad), _ptr(buf.codes), _ptr(buf.absmax), n, block),
                (*_book_ptrs(buf), float(lr), float(momentum), float(1 - dampening),
                 float(weight_decay), int(nesterov), int(maximize), int(first)))
    _bump(p, buf.codes, buf.absmax)


def adam8bit(p: Tensor, grad: Tensor, exp_avg, exp_avg_sq, *, step: int, lr: float,
             beta1: float, beta2: float, eps: float, weight_decay: float, decoupled: bool,
             maximize: bool) -> None:
    """Fused Adam8bit / AdamW8bit step for one tensor; both moments QTensors."""
    _check_args(p, grad, [("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)])
    if exp_avg_sq.block_size != exp_avg.block_size:
        raise ValueError(f"exp_avg and exp_avg_sq must share a block_size, got "
                         f"{exp_avg.block_size} and {exp_avg_sq.block_size}")
    n, block = p.numel(), exp_avg.block_size
    nb = exp_avg.absmax.numel()
    step_size = lr / (1 - beta1 ** step)
    bc2_sqrt = (1 - beta2 ** step) ** 0.5
    _run_blocks("memlab_adam8bit", nb, n,
                (_ptr(p), _ptr(grad), _ptr(exp_avg.codes), _ptr(exp_avg.absmax),
                 _ptr(exp_avg_sq.codes), _ptr(exp_avg_sq.absmax), n, block),
                (*_book_ptrs(exp_avg), *_book_ptrs(exp_avg_sq), float(1 - beta1), float(beta2),
                 float(1 - beta2), float(eps), float(weight_decay), float(1 - lr * weight_decay),
                 int(decoupled), int(maximize), float(step_size), float(bc2_sqrt),
                 int(exp_avg_sq._book.zero_index)))
    _bump(p, exp_avg.codes, exp_avg.absmax, exp_avg_sq.codes, exp_avg_sq.absmax)


# ----------------------------------------------------------------------------------------------
# many tensors in one call: a parameter group's 8-bit tensors


def _threads_for(numel: int, nblocks: int) -> int:
    return min(torch.get_num_threads(), max(1, numel // MIN_PER_THREAD), nblocks)


def _array(ctype, values):
    return (ctype * max(1, len(values)))(*values)


def _many_ok(items, nstates: int) -> bool:
    """One call can serve ``items`` (p, grad, *states): every state shares one block size, each
    state one code book (true for an optimizer's own states), and the blocks may be split over
    threads (an OpenMP team, or one thread)."""
    bs = items[0][2].block_size
    first = items[0][2:2 + nstates]
    if any(q.block_size != bs for q in first):
        return False
    for it in items:
        for k, q in enumerate(first):
            s = it[2 + k]
            if s.block_size != q.block_size or s._book is not q._book:
                return False
    numel = sum(it[0].numel() for it in items)
    nb = sum(it[2].absmax.numel() for it in items)
    return _threads_for(numel, nb) <= 1 or threading_mode() == "openmp"


def sgd8bit_many(items, *, lr: float, momentum: float, dampening: float, weight_decay: float,
                 nesterov: bool, maximize: bool) -> None:
    """Fused SGD8bit step for many tensors in one C call: ``items`` are (p, grad, buf, first)
    with buf a QTensor; the same bits as :func:`sgd8bit` on each."""
    if len(items) == 1 or not _many_ok(items, 1):
        for p, g, b, first in items:
            sgd8bit(p, g, b, lr=lr, momentum=momentum, dampening=dampening,
                    weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                    first=first)
        return
    lib = library()
    ptrs, ns, firsts, numel, nb = [], [], [], 0, 0
    for p, g, b, first in items:
        _check_args(p, g, [("momentum_buffer", b)])
        ptrs += [_ptr(p), _ptr(g), _ptr(b.codes), _ptr(b.absmax)]
        ns.append(p.numel())
        firsts.append(int(first))
        numel, nb = numel + p.numel(), nb + b.absmax.numel()
    buf = items[0][2]
    rc = lib.memlab_sgd8bit_multi(
        _threads_for(numel, nb), len(items), _array(ctypes.c_int64, ptrs),
        _array(ctypes.c_int64, ns), _array(ctypes.c_int32, firsts), buf.block_size,
        *_book_ptrs(buf), float(lr), float(momentum), float(1 - dampening), float(weight_decay),
        int(nesterov), int(maximize))
    _raise_on_failure([rc])
    _bump(*[t for p, _, b, _ in items for t in (p, b.codes, b.absmax)])


def adam8bit_many(items, *, lr: float, beta1: float, beta2: float, eps: float,
                  weight_decay: float, decoupled: bool, maximize: bool) -> None:
    """Fused Adam8bit / AdamW8bit step for many tensors in one C call: ``items`` are (p, grad,
    exp_avg, exp_avg_sq, step), both moments QTensors; the same bits as :func:`adam8bit` on
    each."""
    if len(items) == 1 or not _many_ok(items, 2):
        for p, g, m, v, step in items:
            adam8bit(p, g, m, v, step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                     weight_decay=weight_decay, decoupled=decoupled, maximize=maximize)
        return
    lib = library()
    ptrs, ns, sizes, roots, numel, nb = [], [], [], [], 0, 0
    for p, g, m, v, step in items:
        _check_args(p, g, [("exp_avg", m), ("exp_avg_sq", v)])
        ptrs += [_ptr(p), _ptr(g), _ptr(m.codes), _ptr(m.absmax), _ptr(v.codes), _ptr(v.absmax)]
        ns.append(p.numel())
        sizes.append(lr / (1 - beta1 ** step))
        roots.append((1 - beta2 ** step) ** 0.5)
        numel, nb = numel + p.numel(), nb + m.absmax.numel()
    m, v = items[0][2], items[0][3]
    rc = lib.memlab_adam8bit_multi(
        _threads_for(numel, nb), len(items), _array(ctypes.c_int64, ptrs),
        _array(ctypes.c_int64, ns), _array(ctypes.c_float, sizes),
        _array(ctypes.c_float, roots), m.block_size, *_book_ptrs(m), *_book_ptrs(v),
        float(1 - beta1), float(beta2), float(1 - beta2), float(eps), float(weight_decay),
        float(1 - lr * weight_decay), int(decoupled), int(maximize), int(v._book.zero_index))
    _raise_on_failure([rc])
    _bump(*[t for p, _, m, v, _ in items for t in (p, m.codes, m.absmax, v.codes, v.absmax)])
