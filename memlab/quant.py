"""Dynamic tree 8-bit data type and block-wise (de)quantization.

References
----------
* T. Dettmers, M. Lewis, S. Shleifer, L. Zettlemoyer, "8-bit Optimizers via Block-wise
  Quantization", ICLR 2022, arXiv 2110.02861: block-wise absmax normalisation + the dynamic
  (tree) data type for optimizer states; the unsigned variant for Adam's second moment.
* T. Dettmers, "8-Bit Approximations for Parallelism in Deep Learning", ICLR 2016,
  arXiv 1511.04561: the dynamic tree data type itself.

A tensor ``x`` is stored as 8-bit *codes* (indices into a sorted table of 256 float values, the
"code" or "map") plus one float32 *absmax* per block of ``block_size`` consecutive elements::

    x ~ code[codes] * absmax[block]                       # dequantize
    codes = argmin_j |x / absmax[block] - code[j]|        # quantize: round to the nearest value

Storage is 1 byte per element + 4 bytes per block (1.016 B/element for blocks of 256).
:class:`QTensor` (the optimizers' states) normalises by multiplying with the float32 reciprocal
``1 / absmax[block]`` rather than dividing, on every path (eager, compiled, the fused C kernel):
a division per element cost more than the rest of the fused encoder. The two differ in the last
bit of ``x / absmax``, so in a code only for a value within one ulp of a midpoint between two
codes; a block whose reciprocal overflows (absmax below ~2.9e-39) is divided.
:func:`quantize_blockwise` divides.

**Zero rule for second moments.** Adam divides by ``sqrt(v)``; an element whose ``v`` is stored
as 0 steps by ``m / eps``, arbitrarily far. Rounding to the nearest code does exactly that to
every element below half the unsigned map's smallest non-zero value (0.325e-6 of its block's
absmax), which happens whenever a block's second moments span more than ~6.5 decades: on
heavy-tailed gradients (per-element scales log-normal, sigma 1.5; 1 M elements, 50 steps) 1.94%
of the second moments became 0 and the parameters ended 58x the size of the whole fp32 update
away from fp32 Adam. So an unsigned :class:`QTensor` (the optimizers' second-moment state) gives
a positive value whose nearest code is 0 the smallest non-zero code instead: no non-zero state
is stored as 0, the stored ``v`` is then *larger* than the true one, so that element's step is
smaller than Adam's, never larger. Measured on that workload (``memlab bench optim``, rows
``drift_to_fp32``): distance to fp32 Adam 0.128 (bitsandbytes 0.50.2 on CPU: 0.278); with a mild
spread (sigma 0.5) 0.0254 before and after. The public :func:`quantize_blockwise` keeps plain
nearest rounding. Every path applies the rule (eager, the fused C kernel, torch.compile on CUDA).
Everything here depends only on torch. The optimizers in ``memlab.optim`` keep their states as
:class:`QTensor` objects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["dynamic_map", "linear_map", "quantize_blockwise", "dequantize_blockwise", "QTensor"]


# ----------------------------------------------------------------------------------------------
# the two data types


def dynamic_map(signed: bool = True) -> Tensor:
    """The 256 values of the 8-bit dynamic tree data type (Dettmers 2016; 2021), sorted.

    Returns a float32 tensor of shape (256,), strictly increasing, in [-1, 1].

    How the 8 bits of a code are read (most significant bit first):

    1. **sign bit** (signed variant only): 0 positive, 1 negative.
    2. **exponent**: the number E of zero bits that follow; the value is scaled by 10**-E.
    3. **marker (indicator) bit**: the first 1 bit. It ends the exponent; everything after it is
    4. **linear fraction bits**: the F bits left after the marker index one of 2**F equal bins
       of [0.1, 1]; the value is the centre of bin k: ``0.1 + 0.9 * (k + 0.5) / 2**F``.

    So a code with E leading zeros has value ``±10**-E * (0.1 + 0.9 * (k + 0.5) / 2**F)``:
    moving the marker bit trades precision (fraction bits) for range (exponent).

    Signed variant (7 bits after the sign): E = 0..6, F = 6 - E, i.e. 64, 32, 16, 8, 4, 2, 1
    values per exponent and sign: 127 positive + 127 negative magnitudes from 0.55e-6 to
    0.99297. The bit pattern ``0000 0000`` (no marker at all) is 0. The pattern ``1000 0000``
    ("negative zero") would duplicate it and is given the value 1.0 instead, so the map holds
    0 and 1.0 but *not* -1.0 (its minimum is -0.99297).

    Unsigned variant (for non-negative tensors such as Adam's second moment): the sign bit is
    spent as one more fraction bit, F = 7 - E, i.e. 128, 64, 32, 16, 8, 4, 2 values for
    E = 0..6 (254 values from 0.325e-6 to 0.99648). ``0000 0000`` is 0 and the one pattern
    left, ``0000 0001`` (E = 7, no fraction bit, the smallest magnitude 0.55e-7), is given the
    value 1.0, so that in both variants the exponent stops at 10**-6 and 1.0 is exact (the
    block's absmax element is then stored without error).

    Total: 2 * 127 + 2 = 256 (signed) and 254 + 2 = 256 (unsigned) distinct values.
    """
    sign_bits = 1 if signed else 0
    values = [0.0, 1.0]                                    # 0000 0000, and the spare pattern
    for e in range(7):                                     # E zeros, then the marker bit
        f = 8 - sign_bits - e - 1                          # fraction bits after the marker
        k = torch.arange(2 ** f, dtype=torch.float64)      # (2**F,)
        mags = 10.0 ** -e * (0.1 + 0.9 * (k + 0.5) / 2 ** f)
        values += mags.tolist()
        if signed:
            values += (-mags).tolist()
    out = torch.tensor(values, dtype=torch.float64).to(torch.float32).sort().values  # (256,)
    assert out.numel() == 256 and bool((out[1:] > out[:-1]).all())
    return out


def linear_map(signed: bool = True) -> Tensor:
    """256 evenly spaced values: the plain int8 grid used as the baseline for the dynamic map.

    Signed: ``k / 127`` for k = -128..127 (int8 absmax quantization: 0 and ±1 exact, step 1/127;
    the value -128/127 is never the nearest to a normalised input). Unsigned: ``k / 255`` for
    k = 0..255 (uint8). float32 (256,), sorted.
    """
    k = torch.arange(-128, 128) if signed else torch.arange(256)
    return (k.to(torch.float64) / (127 if signed else 255)).to(torch.float32)


# ----------------------------------------------------------------------------------------------
# codebook: nearest-value encoding for one map on one device


class _Codebook:
    """A sorted map of 256 values plus what is needed to round to its nearest value fast.

    ``encode`` returns, for each normalised input, the number of midpoints strictly below it,
    i.e. ``torch.bucketize(x, midpoints)``: the index of the nearest value (a tie goes to the
    lower value). On CPU a binary search per element is slow (~18 ns), so when the map allows it
    the search is replaced by a table lookup on the top 16 bits of the float32 input (sign,
    exponent, 7 mantissa bits) plus one comparison with the single midpoint that can fall in that
    range. The table is built with bucketize and checked at build time; maps whose midpoints are
    too close for 16 bits fall back to bucketize. Same answers either way (tested).
    """

    def __init__(self, code: Tensor, device: torch.device):
        self.code = code.to(device=device, dtype=torch.float32).contiguous()  # (256,)
        self.mid = (self.code[1:] + self.code[:-1]) / 2                        # (255,)
        self.lut = self.lut32 = self.lut_mid = None
        self.zero_index = int(self.code.abs().argmin())
        if device.type == "cpu":
            self._build_lut()

    def _build_lut(self) -> None:
        top = torch.arange(-(2 ** 15), 2 ** 15, dtype=torch.int32)   # (65536,) top 16 bits
        ends = torch.stack([top << 16, (top << 16) | 0xFFFF]).view(torch.float32)  # (2, 65536)
        ends = torch.where(ends.isnan(), ends.flip(0), ends)         # inf's bucket: [inf, inf]
        ends = ends.nan_to_num(nan=0.0, posinf=math.inf, neginf=-math.inf)  # NaN: any bucket
        lo, hi = ends.aminmax(dim=0)                                 # (65536,) value range
        base = torch.bucketize(lo, self.mid)                         # midpoints below the bucket
        if bool((torch.bucketize(hi, self.mid, right=True) > base + 1).any()):
            return                                # two midpoints share a bucket: use bucketize
        mid_ext = torch.cat([self.mid, self.mid.new_full((1,), math.inf)])  # (256,)
        self.lut = base.to(torch.uint8)                              # (65536,) lower candidate
        self.lut32 = base.to(torch.int32)                            # the same, for C gathers
        self.lut_mid = mid_ext[base]                                 # (65536,) its upper midpoint

    def encode(self, xn: Tensor, out: Tensor) -> Tensor:
        """Nearest-value indices of normalised float32 ``xn`` (N,), written into uint8 ``out``."""
        if self.lut is None or xn.device.type != "cpu":
            return out.copy_(torch.bucketize(xn, self.mid, out_int32=True))
        key = (xn.view(torch.int32) >> 16).add_(2 ** 15)              # (N,) int32 in 0..65535
        torch.index_select(self.lut, 0, key, out=out)                # (N,) lower candidate
        return out.add_(xn > self.lut_mid.index_select(0, key))      # +1 past the midpoint

    def decode(self, codes: Tensor, out: Optional[Tensor] = None) -> Tensor:
        if out is None:
            return self.code.index_select(0, codes.int())            # (N,) f32
        return torch.index_select(self.code, 0, codes.int(), out=out)


_BOOKS: dict = {}


def _codebook(code: Tensor, device: torch.device) -> _Codebook:
    key = (device.type, device.index, tuple(code.tolist()))
    book = _BOOKS.get(key)
    if book is None:
        if len(_BOOKS) >= 64:                  # user maps: keep the cache bounded
            _BOOKS.clear()
            _MAPS.clear()
        book = _BOOKS[key] = _Codebook(code, device)
    return book


_MAPS: dict = {}


def _state_book(signed: bool, device: torch.device) -> _Codebook:
    """The cached dynamic-map codebook the optimizers use.

    Built from real tensors outside any dispatch mode, even inside ``FakeTensorMode``
    (``memlab.memory.estimate``) or a ``MemoryMeter``: the codebook (value table, 16-bit lookup
    tables; ~0.6 MiB per map and device) is a constant shared by all optimizers, not state that
    scales with the model.
    """
    key = (signed, device.type, device.index)
    if key not in _MAPS:
        with _real_tensors():
            _MAPS[key] = _codebook(dynamic_map(signed), device)
    return _MAPS[key]


def _real_tensors():
    """Step outside every dispatch mode for a moment: fake tensors (``estimate``) and
    ``MemoryMeter``, so the cached codebook tables (~0.6 MiB of constants shared by every
    optimizer, never freed) are neither fake nor counted as one run's optimizer state."""
    try:
        from torch.utils._python_dispatch import _disable_current_modes
        return _disable_current_modes()
    except ImportError:  # pragma: no cover - older torch
        from torch._subclasses.fake_tensor import unset_fake_temporarily
        return unset_fake_temporarily()


# ----------------------------------------------------------------------------------------------
# block-wise quantization (shared kernel)


def _parts(n: int, block_size: int):
    """The element ranges that reshape into whole blocks: ((start, end, rows), ...) for the full
    blocks and the short tail block (at most two parts, never a loop over blocks)."""
    full = n // block_size
    parts = []
    if full:
        parts.append((0, full * block_size, full))
    if n > full * block_size:
        parts.append((full * block_size, n, 1))
    return parts


def _quantize_into(x: Tensor, book: _Codebook, block_size: int, codes: Tensor, absmax: Tensor,
                   scratch: Optional[Tensor] = None, nonneg: bool = False,
                   keep_nonzero: bool = False, reciprocal: bool = False,
                   given: bool = False) -> None:
    """Quantize flat float32 ``x`` (N,) into ``codes`` (N,) uint8 and ``absmax`` (num_blocks,).

    ``nonneg``: the caller guarantees x >= 0 (Adam's second moment): |x| is x, one pass less.
    ``keep_nonzero``: a positive element whose nearest code is 0 gets the smallest non-zero
    code instead (for a map whose zero is its smallest value: the unsigned state map).
    ``reciprocal``: normalise by multiplying with the float32 reciprocal ``1 / absmax`` instead
    of dividing (the optimizer states, as the fused C kernel: a division per element costs
    more than the rest of the encoder; the result differs from the division in the last bit,
    so a code only for a value within one ulp of a midpoint). A block whose reciprocal
    overflows (absmax below ~2.9e-39) or is NaN is divided. ``given``: ``absmax`` already
    holds each block's value (computed elsewhere, e.g. all-reduced over ranks): only encode."""
    if nonneg:
        ax, xn = x, (scratch if scratch is not None else torch.empty_like(x))  # (N,) x / absmax
    else:
        xn = torch.abs(x, out=scratch) if scratch is not None else x.abs()  # |x|, then x / absmax
        ax = xn
    row = 0
    for start, end, rows in _parts(x.numel(), block_size):
        a = absmax[row:row + rows]                                        # (rows,)
        if not given:
            torch.amax(ax[start:end].view(rows, -1), dim=1, out=a)
        scale = a.masked_fill(a == 0, 1.0)                                # all-zero block: x / 1
        xr, out = x[start:end].view(rows, -1), xn[start:end].view(rows, -1)
        if not reciprocal:
            torch.div(xr, scale[:, None], out=out)
        else:
            r = torch.reciprocal(scale)                                   # (rows,)
            bad = ~torch.isfinite(r)                                      # tiny / NaN absmax
            if torch.compiler.is_compiling() or x.device.type != "cpu":
                torch.where(bad[:, None], xr / scale[:, None], xr * r[:, None], out=out)
            else:                                                         # rare: divide those
                torch.mul(xr, r[:, None], out=out)
                if type(bad) is Tensor and bool(bad.any()):    # (fake: no values to read)
                    out[bad] = xr[bad] / scale[bad, None]
        row += rows
    book.encode(xn, codes)
    if keep_nonzero:                                                      # 0 only for x == 0
        codes.add_((codes == book.zero_index) & (xn > 0))


def _dequantize_into(codes: Tensor, absmax: Tensor, book: _Codebook, block_size: int,
                     out: Optional[Tensor] = None) -> Tensor:
    """float32 (N,) values of flat uint8 ``codes`` (written into ``out`` when given)."""
    out = book.decode(codes, out)                                         # (N,) code values
    row = 0
    for start, end, rows in _parts(codes.numel(), block_size):
        out[start:end].view(rows, -1).mul_(absmax[row:row + rows, None])  # (rows, block) * absmax
        row += rows
    return out


# ----------------------------------------------------------------------------------------------
# public functions (validated)


def _check_block_size(block_size) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    return block_size


def _check_code(code) -> Tensor:
    if not isinstance(code, Tensor) or not code.is_floating_point():
        raise TypeError(f"code must be a floating-point tensor of 256 sorted values, got "
                        f"{type(code).__name__ if not isinstance(code, Tensor) else code.dtype}")
    if code.shape != (256,):
        raise ValueError(f"code must have shape (256,), got {tuple(code.shape)}")
    if not bool(torch.isfinite(code).all()) or not bool((code[1:] >= code[:-1]).all()):
        raise ValueError("code must hold 256 finite values sorted in increasing order, got "
                         f"an unsorted or non-finite map (min {code.min().item():g}, "
                         f"max {code.max().item():g})")
    return code


def num_blocks(numel: int, block_size: int) -> int:
    return -(-numel // block_size)


def _blocks(numel: int, block_size: int, phase: int = 0) -> int:
    """Blocks that ``numel`` elements touch when the first starts ``phase`` elements into a
    block (a shard of a tensor that does not start on a block boundary)."""
    return num_blocks(numel + phase, block_size) if numel else 0


def quantize_blockwise(x: Tensor, code: Tensor, block_size: int = 256) -> Tuple[Tensor, Tensor]:
    """Quantize ``x`` to 8 bits, one absmax per block of ``block_size`` consecutive elements.

    Each block is divided by its absolute maximum and every element is rounded to the nearest
    value of ``code`` (ties go to the lower value). A short last block is allowed; an all-zero
    block gets absmax 0 and dequantizes to exact zeros. A non-finite element makes its block's
    absmax non-finite, so that block (and only that block) dequantizes to non-finite values.

    Returns ``(codes, absmax)``: uint8 of ``x.numel()`` elements (flat) and float32
    ``(ceil(numel / block_size),)``.
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got "
                        f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")
    _check_block_size(block_size)
    book = _codebook(_check_code(code), x.device)
    flat = x.detach().reshape(-1).to(torch.float32)                       # (N,)
    codes = torch.empty(flat.numel(), dtype=torch.uint8, device=x.device)  # (N,)
    absmax = torch.empty(num_blocks(flat.numel(), block_size), dtype=torch.float32,
                         device=x.device)                                 # (num_blocks,)
    _quantize_into(flat, book, block_size, codes, absmax)
    return codes, absmax


def dequantize_blockwise(codes: Tensor, absmax: Tensor, code: Tensor, block_size: int = 256,
                         shape=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of :func:`quantize_blockwise`: ``code[codes] * absmax[block]``, reshaped to
    ``shape`` (default: flat) and cast to ``dtype``."""
    if not isinstance(codes, Tensor) or codes.dtype != torch.uint8:
        raise TypeError(f"codes must be a uint8 tensor, got "
                        f"{codes.dtype if isinstance(codes, Tensor) else type(codes).__name__}")
    _check_block_size(block_size)
    n = codes.numel()
    if not isinstance(absmax, Tensor) or absmax.numel() != num_blocks(n, block_size):
        got = absmax.numel() if isinstance(absmax, Tensor) else type(absmax).__name__
        raise ValueError(f"absmax must hold ceil({n} / {block_size}) = "
                         f"{num_blocks(n, block_size)} values, got {got}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    shape = (n,) if shape is None else tuple(shape)
    if math.prod(shape) != n:
        raise ValueError(f"shape must have {n} elements, got shape {shape}")
    book = _codebook(_check_code(code), codes.device)
    out = _dequantize_into(codes.reshape(-1), absmax.reshape(-1).float(), book, block_size)
    return out.view(shape).to(dtype)


# ----------------------------------------------------------------------------------------------
# the quantized state type the optimizers use


@dataclass
class QTensor:
    """An 8-bit block-wise quantized float tensor: the state type of the 8-bit optimizers.

    ``codes`` (N,) uint8 and ``absmax`` (num_blocks,) float32 are the only storages; ``shape``
    is the logical shape, ``signed`` picks the signed or unsigned dynamic map. ``phase``: the
    first element sits that far into its block (a shard of a larger tensor, as under FSDP2), so
    the first block holds ``block_size - phase`` elements. The object is a
    thin view: building one around existing tensors (e.g. ``optimizer.state`` entries) costs
    nothing, and ``copy_`` writes into those tensors.
    """

    codes: Tensor
    absmax: Tensor
    shape: Tuple[int, ...]
    signed: bool = True
    block_size: int = 256
    phase: int = 0

    def __post_init__(self):
        self.shape = tuple(self.shape)
        _check_block_size(self.block_size)
        n = math.prod(self.shape)
        if isinstance(self.phase, bool) or not isinstance(self.phase, int) \
                or not 0 <= self.phase < self.block_size:
            raise ValueError(f"phase must be an int in [0, block_size={self.block_size}), got "
                             f"{self.phase!r}")
        if self.codes.dtype != torch.uint8 or self.codes.numel() != n:
            raise ValueError(f"codes must be uint8 with {n} elements for shape {self.shape}, got "
                             f"{self.codes.dtype} with {self.codes.numel()}")
        rows = _blocks(n, self.block_size, self.phase)
        if self.absmax.dtype != torch.float32 or self.absmax.numel() != rows:
            raise ValueError(f"absmax must be float32 with {rows} values "
                             f"(block_size={self.block_size}, phase={self.phase}), got "
                             f"{self.absmax.dtype} with {self.absmax.numel()}")
        self._book = _state_book(self.signed, self.codes.device)

    @classmethod
    def trusted(cls, codes: Tensor, absmax: Tensor, shape, signed: bool, block_size: int,
                phase: int, book: Optional[_Codebook] = None) -> "QTensor":
        """A QTensor without the checks, over tensors known to form a valid one with these
        arguments (a view of a valid QTensor; the 8-bit optimizers' per-step views of unchanged
        states). ``book``: the codebook when the caller has it."""
        q = object.__new__(cls)
        q.codes, q.absmax, q.shape, q.signed = codes, absmax, shape, signed
        q.block_size, q.phase = block_size, phase
        q._book = book if book is not None else _state_book(signed, codes.device)
        return q

    @classmethod
    def zeros(cls, shape, signed: bool = True, block_size: int = 256, device=None,
              phase: int = 0) -> "QTensor":
        shape, block_size = tuple(shape), _check_block_size(block_size)
        n = math.prod(shape)
        book = _state_book(signed, torch.device(device or "cpu"))
        codes = torch.full((n,), book.zero_index, dtype=torch.uint8, device=device)  # (N,)
        absmax = torch.zeros(_blocks(n, block_size, phase if isinstance(phase, int) else 0),
                             dtype=torch.float32, device=device)
        return cls(codes, absmax, shape, signed, block_size, phase)

    @classmethod
    def from_float(cls, x: Tensor, signed: bool = True, block_size: int = 256) -> "QTensor":
        q = cls.zeros(x.shape, signed, block_size, x.device)
        return q.copy_(x)

    @property
    def code(self) -> Tensor:
        return self._book.code

    def numel(self) -> int:
        return self.codes.numel()

    @property
    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + \
            self.absmax.numel() * self.absmax.element_size()

    def narrow(self, start: int, end: int, any_start: bool = False) -> "QTensor":
        """Flat view of elements ``start:end`` sharing storage: ``start`` on a block boundary,
        or anywhere with ``any_start=True`` (the view then has a ``phase``: it starts inside a
        block whose absmax it shares with this tensor)."""
        bs, at = self.block_size, start + self.phase
        if at % bs and not any_start:
            raise ValueError(f"start must be on a block boundary (block_size={bs}, phase="
                             f"{self.phase}), got {start}")
        first = at // bs
        absmax = self.absmax[first:first + _blocks(end - start, bs, at % bs)]
        return type(self).trusted(self.codes[start:end], absmax, (end - start,), self.signed, bs,
                                  at % bs if end > start else 0, self._book)

    def one_block(self, start: int, end: int, cls: Optional[type] = None) -> "QTensor":
        """Elements ``start:end``, all inside one block, as a phase-0 view (of type ``cls``,
        default this one's) of one short block: decoded and encoded with that block's absmax,
        which it shares with this tensor."""
        q = self.narrow(start, end, any_start=True)
        if cls is not None and cls is not type(q):
            q.__class__ = cls
        q.phase = 0
        return q

    def _split_phase(self):
        """(head, rest): the elements before the first block boundary as a phase-0 QTensor of
        one short block, and the rest (phase 0); head is None when ``phase`` is 0."""
        n = self.codes.numel()
        if not self.phase or not n:
            return None, self
        h = min(self.block_size - self.phase, n)
        return self.one_block(0, h), self.narrow(h, n)

    def dequantize(self, dtype: torch.dtype = torch.float32, out: Optional[Tensor] = None) -> Tensor:
        """A float tensor of ``shape``: new, or ``out`` (float32, ``numel`` elements) filled."""
        if out is not None:
            if out.dtype != torch.float32 or out.numel() != self.codes.numel():
                raise ValueError(f"out must be float32 with {self.codes.numel()} elements, got "
                                 f"{out.dtype} with {out.numel()}")
            out = out.view(-1)
        head, rest = self._split_phase()
        if head is not None:
            out = out if out is not None else torch.empty(self.codes.numel(), dtype=torch.float32,
                                                          device=self.codes.device)
            head.dequantize(out=out[:head.numel()])
            rest.dequantize(out=out[head.numel():])
            return out.view(self.shape).to(dtype)
        out = _dequantize_into(self.codes, self.absmax, self._book, self.block_size, out)
        return out.view(self.shape).to(dtype)

    def copy_(self, x: Tensor, scratch: Optional[Tensor] = None,
              nonneg: bool = False) -> "QTensor":
        """Quantize ``x`` (same number of elements) into this tensor's storages, in place.

        ``scratch``: optional float32 buffer of ``numel`` elements that may be overwritten
        (saves one allocation in the optimizer step). ``nonneg=True``: the caller guarantees
        ``x >= 0`` everywhere (Adam's second moment), which skips the |x| pass; a negative
        element then gives a wrong block."""
        return self._encode(x, scratch, nonneg, given=False)

    def encode_with_absmax_(self, x: Tensor) -> "QTensor":
        """Quantize ``x`` with the absmax already in ``absmax`` (not recomputed): the last part
        of a step whose blocks are shared with other ranks (their absmax is all-reduced first).
        Same codes as ``copy_`` gives when ``absmax`` holds the blocks' max |x|."""
        return self._encode(x, None, False, given=True)

    def _encode(self, x: Tensor, scratch: Optional[Tensor], nonneg: bool,
                given: bool) -> "QTensor":
        flat = x.detach().reshape(-1).to(torch.float32)                   # (N,)
        if flat.numel() != self.codes.numel():
            raise ValueError(f"x must have {self.codes.numel()} elements, got {flat.numel()}")
        if scratch is not None:
            scratch = scratch.view(-1)
        head, rest = self._split_phase()
        if head is not None:                  # the first (partial) block, then the rest
            h = head.numel()
            QTensor._encode(head, flat[:h], None if scratch is None else scratch[:h], nonneg,
                            given)
            QTensor._encode(rest, flat[h:], None if scratch is None else scratch[h:], nonneg,
                            given)
            return self
        _quantize_into(flat, self._book, self.block_size, self.codes, self.absmax, scratch,
                       nonneg=nonneg, keep_nonzero=not self.signed, reciprocal=True,
                       given=given)
        return self

    quantize_ = copy_
