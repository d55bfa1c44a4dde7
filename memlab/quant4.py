"""4-bit data types for optimizer states: dynamic-exponent and zero-free linear maps, rank-1
normalization, two codes per byte.

References
----------
* B. Li, J. Chen, J. Zhu, "Memory Efficient Optimizers with 4-bit States", NeurIPS 2023,
  arXiv 2309.01507: first moment block-wise (B128) with the signed dynamic-exponent (DE) map;
  second moment with rank-1 normalization and a linear map that excludes zero (the
  "zero-point problem": a second moment stored as 0 makes Adam step by m / eps).
* T. Dettmers, "8-Bit Approximations for Parallelism in Deep Learning", ICLR 2016,
  arXiv 1511.04561: the dynamic-exponent (dynamic tree) data type, here at 4 bits.

The two maps (16 sorted float32 values each, in [-1, 1])::

    dynamic_exponent_map(signed=True, bits=4)   # the first moment's map (DE, 4 bits)
      = 0, 1, and +-{0.0055, 0.0325, 0.0775, 0.2125, 0.4375, 0.6625, 0.8875}
    linear_nozero_map(bits=4)                   # the second moment's map: (i + 1) / 16
      = 1/16, 2/16, ..., 16/16                  # i = 0..15; no zero

Normalization: ``x ~ code[c] * scale``, ``c = argmin_j |x / scale - code[j]|`` (nearest value,
a tie goes to the lower one), or, dithered (:func:`dither`, what :mod:`memlab.optim4bit` uses
by default), the value below or above ``x / scale`` with the probability that makes the stored
value unbiased. Block-wise: ``scale`` is the absmax of the block of ``block_size``
(128) consecutive elements. Rank-1 (the second moment of a tensor with at least two dimensions of
size > 1): one max per index of each such axis, ``s_k[i] = max |x|`` over all elements whose
k-th index is i (for a matrix: the row max and the column max), and the element's scale is
``min_k s_k[i_k]``, never smaller than |x| itself. With the zero-free map a positive element is
stored as at least ``scale / 16 > 0``: no non-zero second moment is ever stored as 0 (it can only
round *up*, making that element's step smaller than Adam's, never larger). Exactly zero stays
zero only when its whole scale is 0 (a block / row or column of zeros).

Packing: codes are 0..15; element ``2i`` sits in the low nibble and ``2i + 1`` in the high
nibble of byte ``i`` (``ceil(N / 2)`` bytes; an odd tail's high nibble is 0).

Memory per element: 0.5 B of codes + 4 B / 128 of block absmax = 0.531 B; rank-1 costs
``4 * sum(dims) / numel`` B instead (0.0078 for 1024 x 1024). :func:`use_rank1` picks rank-1 for
the default ``rank1=None`` where those scales are at most one per 32 elements (e.g. 1024 x 1024,
512 x 256, a 128 x 128 x 3 x 3 conv, 64 x 64; not 512 x 16), so a 4-bit Adam state never takes
more than 0.531 + 0.625 = 1.156 B/param (+ 1 byte for an odd tensor), and ~1.04 on a network
whose large tensors dominate; rank-1 is the paper's choice for the second moment, and it tracks
fp32 Adam better than block absmaxes (a block's small second moments would be stored as at
least absmax / 16).
Everything here depends only on torch and works on fake tensors (``memlab.memory.estimate``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["dynamic_exponent_map", "linear_nozero_map", "pack4", "unpack4", "use_rank1",
           "rank1_maxes", "rank1_scale", "quantize4_blockwise", "dequantize4_blockwise",
           "Q4Tensor", "error_rows"]


# ----------------------------------------------------------------------------------------------
# the two maps


def dynamic_exponent_map(signed: bool = True, bits: int = 4) -> Tensor:
    """The ``2**bits`` values of the dynamic-exponent (DE) data type, sorted, float32.

    A code's bits after the sign bit (signed map only) read: E zero bits (the exponent, value
    scaled by ``10**-E``), a marker 1 bit, then F = bits - 1 - sign - E linear fraction bits whose
    value k picks the centre of bin k of 2**F equal bins of [0.1, 1]::

        value = +-10**-E * (0.1 + 0.9 * (k + 0.5) / 2**F),   E = 0 .. bits - 2

    The all-zero pattern (no marker) is 0, and the one pattern left (signed: "negative zero";
    unsigned: the marker in the last bit, no fraction) is 1.0, so 1.0 (a block's absmax) is
    exact. 4 bits signed: E = 0, 1, 2 with 4, 2, 1 magnitudes = ``{0.2125, 0.4375, 0.6625,
    0.8875}, {0.0325, 0.0775}, {0.0055}``, both signs, plus 0 and 1: 16 values. ``bits=8``
    gives :func:`memlab.quant.dynamic_map` exactly (tested).
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in [2, 8], got {bits!r}")
    if not isinstance(signed, bool):
        raise TypeError(f"signed must be a bool, got {type(signed).__name__}")
    if signed and bits < 3:
        raise ValueError(f"bits must be >= 3 for a signed map, got {bits}")
    values = [0.0, 1.0]
    for e in range(bits - 1):
        f = bits - 1 - int(signed) - e                     # fraction bits after the marker
        if f < 0:
            break
        k = torch.arange(2 ** f, dtype=torch.float64)      # (2**F,)
        mags = (10.0 ** -e * (0.1 + 0.9 * (k + 0.5) / 2 ** f)).tolist()
        values += mags + ([-x for x in mags] if signed else [])
    out = torch.tensor(values, dtype=torch.float64).to(torch.float32).sort().values
    assert out.numel() == 2 ** bits and bool((out[1:] > out[:-1]).all())
    return out                                             # (2**bits,)


def linear_nozero_map(bits: int = 4) -> Tensor:
    """``(i + 1) / 2**bits`` for i = 0 .. 2**bits - 1: the evenly spaced unsigned map without
    0 (Li et al. 2023, sec. 4.2). 4 bits: 1/16, 2/16, ..., 1. float32 (2**bits,), sorted."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in [1, 8], got {bits!r}")
    i = torch.arange(2 ** bits, dtype=torch.float64)
    return ((i + 1) / 2 ** bits).to(torch.float32)


def _real():
    """Leave every dispatch mode for a moment (fake tensors, ``MemoryMeter``): the cached maps
    are constants shared by every optimizer, not one run's state."""
    from torch.utils._python_dispatch import _disable_current_modes
    return _disable_current_modes()


_TABLES: dict = {}
_DITHER_TABLES: dict = {}      # the same keys: what dithered rounding reads (_dither_table)


_BOOK_OF: dict = {}     # id(cached midpoints) -> memlab.quant._Codebook of their map


def _table(signed: bool, device: torch.device) -> Tuple[Tensor, Tensor]:
    """(values (16,), midpoints (15,)) of the state map on ``device``, cached."""
    device = torch.device(device)
    key = (signed, device.type, device.index)
    if key not in _TABLES:
        from memlab.quant import _Codebook
        with _real():
            code = dynamic_exponent_map(True, 4) if signed else linear_nozero_map(4)
            code = code.to(device)
            _TABLES[key] = (code, (code[1:] + code[:-1]) / 2)
            _BOOK_OF[id(_TABLES[key][1])] = _nan_as_bucketize(_Codebook(code, device))
            _DITHER_TABLES[key] = (code[1:15].clone(), code[1:] - code[:-1])   # (14,), (15,)
    return _TABLES[key]


def _nan_as_bucketize(book):
    """Make the lookup give NaN bucketize's answer (past every midpoint): the keys whose
    floats are all NaN, and the key of -inf (its other floats are NaNs; -inf is never a
    normalised value: it only comes from -inf / inf = NaN)."""
    if book.lut is not None:
        u = torch.arange(65536, dtype=torch.int32)                   # top 16 bits, unsigned
        nan = ((u & 0x7F80) == 0x7F80) & (((u & 0x7F) != 0) | (u == 0xFF80))
        idx = u[nan] ^ 0x8000                                         # the table's index
        book.lut[idx], book.lut32[idx] = book.mid.numel(), book.mid.numel()
        book.lut_mid[idx] = math.inf
    return book


def sqrt_rounded(v: Tensor) -> Tensor:
    """sqrt(v), correctly rounded on CPU (through float64; torch's vectorized float32 sqrt is
    not on every CPU, and the C step of :mod:`memlab._q4_kernel` takes ``sqrtf``): the torch and
    C steps give the same bits. Elsewhere torch's sqrt."""
    if v.device.type == "cpu" and v.dtype == torch.float32:
        return v.double().sqrt_().float()
    return v.sqrt()


def _zero_code(signed: bool) -> int:
    """The code whose value is 0 (signed map), or the smallest one (zero-free map)."""
    return 7 if signed else 0


# ----------------------------------------------------------------------------------------------
# dithered rounding

DITHER_I = 3242174889          # round(2**32 / g), g = 1.32471... the plastic number
DITHER_PIECE = 1 << 14         # elements encoded at a time by the torch ops on CPU


def _hash32(x: int) -> int:
    """A 32-bit integer mixer (xor-shift-multiply, the "lowbias32" constants): a different,
    uniformly spread value for every step."""
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def dither_base(step: int, signed: bool) -> int:
    """The uint32 shift of the lattice at ``step`` for the first (signed) or second moment (the
    C step takes it as it is)."""
    return _hash32(2 * int(step) + bool(signed))


def dither(start: int, n: int, step: int, signed: bool, device=None) -> Tensor:
    """The dither thresholds of elements [start, start + n) of a tensor (flat index) at
    ``step``: float32 (n,) in [0, 1), ``u = ((DITHER_I * i + dither_base(step)) mod 2**32 >> 8)
    / 2**24``, integers only (so the C step computes the same u bit for bit).

    A lattice shifted at random each step: within a step neighbouring elements' thresholds are
    1/g mod 1 apart (a Kronecker low-discrepancy sequence: a block's thresholds spread evenly,
    so its rounding errors cancel), and the shift is a hash of the step, so for each element the
    thresholds of successive steps are independent uniform draws. That independence matters:
    the stored moment feeds the next update, and a threshold sequence that is regular in time
    (a Weyl sequence) locks onto that feedback -- a 4-bit EMA of a constant 0.3 settles at 0.274
    with it, at 0.300 with this one."""
    h = torch.arange(start, start + n, dtype=torch.int64, device=device)          # (n,) i
    if start + n > 1 << 31:             # DITHER_I * i would pass 2**63: by 16-bit halves
        h.bitwise_and_(0xFFFFFFFF)
        hi = (h >> 16).mul_(DITHER_I).bitwise_and_(0xFFFF).bitwise_left_shift_(16)
        h.bitwise_and_(0xFFFF).mul_(DITHER_I).add_(hi)
        del hi
    else:
        h.mul_(DITHER_I)
    h.add_(dither_base(step, signed)).bitwise_and_(0xFFFFFFFF).bitwise_right_shift_(8)
    return h.to(torch.float32).mul_(2.0 ** -24)


def _dither_table(signed: bool, device) -> Tuple[Tensor, Tensor]:
    """(thresholds: map values 1..14 (14,); gaps: value[j + 1] - value[j], j = 0..14 (15,)) of
    a state map on ``device``, cached with the map (:func:`_table`; tensors of their own: a
    view made inside a metered step would count the table as the step's)."""
    device = torch.device(device)
    _table(signed, device)
    return _DITHER_TABLES[(signed, device.type, device.index)]


def _encode_dithered(xn: Tensor, signed: bool, u: Tensor) -> Tensor:
    """Dithered codes of normalised ``xn`` with thresholds ``u`` (same shape): between the map
    values lo <= xn < hi around it, hi when ``u * (hi - lo) < xn - lo``, else lo -- unbiased
    over the dither (E[value] = xn inside the map's range). Below the smallest value: code 0;
    from the largest up: 15; NaN: 15 (as the nearest code). uint8, xn's shape."""
    code, _ = _table(signed, xn.device)
    thr, gaps = _dither_table(signed, xn.device)
    j = torch.searchsorted(thr, xn.contiguous(), right=True, out_int32=True)  # values 1..14 <= xn
    d = xn - code[j]                                                 # (N,) past lo
    c = j.add_(u.mul_(gaps[j]) < d).masked_fill_(xn.isnan(), 15)     # u consumed
    del d
    return c.to(torch.uint8)


def _codes(xn: Tensor, signed: bool, start: int = 0, step: Optional[int] = None) -> Tensor:
    """Codes of normalised ``xn``, elements [start, start + numel) of their tensor: the nearest
    values (``step=None``) or dithered at ``step`` (:func:`dither`)."""
    if step is None:
        return _encode(xn, _table(signed, xn.device)[1])
    flat = xn.reshape(-1)
    out = torch.empty(flat.shape, dtype=torch.uint8, device=xn.device)
    piece = DITHER_PIECE if xn.device.type == "cpu" else max(1, flat.numel())   # GPU: launches
    for a in range(0, flat.numel(), piece):             # temporaries of one piece (~20 B each)
        x = flat[a:a + piece]
        out[a:a + x.numel()] = _encode_dithered(x, signed, dither(start + a, x.numel(), step,
                                                                  signed, xn.device))
    return out.view(xn.shape)


# ----------------------------------------------------------------------------------------------
# packing


def pack4(codes: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """Integer codes 0..15 (N,) -> uint8 (ceil(N/2),): element 2i low nibble, 2i+1 high."""
    c = codes.reshape(-1).to(torch.uint8)                 # (N,)
    if c.numel() % 2:
        c = torch.cat([c, c.new_zeros(1)])                # (N+1,) pad the high nibble with 0
    c = c.view(-1, 2)                                     # (ceil(N/2), 2)
    if out is None:
        return c[:, 0] | (c[:, 1] << 4)
    return torch.bitwise_or(c[:, 0], c[:, 1] << 4, out=out)


def unpack4(packed: Tensor, n: int) -> Tensor:
    """uint8 (ceil(n/2),) -> codes uint8 (n,), the inverse of :func:`pack4`."""
    return torch.stack([packed & 15, packed >> 4], dim=1).view(-1)[:n]   # (n,)


# ----------------------------------------------------------------------------------------------
# normalization


def _dims(shape: Sequence[int]) -> Tuple[int, ...]:
    return tuple(d for d in shape if d != 1)


def num_blocks(numel: int, block_size: int) -> int:
    return -(-numel // block_size)


RANK1_ELEMENTS_PER_SCALE = 32     # rank1=None: rank-1 where its scales are <= numel / 32


def use_rank1(shape: Sequence[int], block_size: int = 128, rank1: Optional[bool] = None) -> bool:
    """Whether a second moment of ``shape`` gets rank-1 normalization: it needs >= 2 dimensions
    of size > 1; ``rank1=True``: always then; ``None`` (default): when its scales (one float per
    index of those axes) number at most one per 32 elements (<= 0.125 B/param: 64 x 64 yes,
    512 x 16 no; the block absmaxes take 4 / block_size B/param); False: never.
    ``block_size`` is accepted for the callers' symmetry; the rule does not depend on it."""
    dims = _dims(shape)
    if rank1 is False or len(dims) < 2:
        return False
    return bool(rank1) or sum(dims) * RANK1_ELEMENTS_PER_SCALE <= math.prod(dims)


def rank1_maxes(x: Tensor) -> Tensor:
    """Per-axis maxima of |x| over its axes of size > 1, concatenated: float32 (sum(dims),).

    For a matrix (n, m): the n row maxima, then the m column maxima."""
    dims = _dims(x.shape)
    a = x.detach().reshape(dims).float().abs()            # (*dims,)
    d = len(dims)
    return torch.cat([a.amax(dim=tuple(j for j in range(d) if j != k)) for k in range(d)])


def rank1_scale(maxes: Tensor, shape: Sequence[int]) -> Tensor:
    """The element scales ``min_k s_k[i_k]`` of :func:`rank1_maxes`, float32 of ``shape``."""
    dims = _dims(shape)
    d, start, scale = len(dims), 0, None
    for k, n in enumerate(dims):
        s = maxes[start:start + n].view([n if j == k else 1 for j in range(d)])  # broadcastable
        scale = s if scale is None else torch.minimum(scale, s)                  # (*dims,)
        start += n
    return scale.reshape(tuple(shape))


def _parts(n: int, block_size: int):
    """((start, end, rows), ...): the full blocks, then the short tail block."""
    full, parts = n // block_size, []
    if full:
        parts.append((0, full * block_size, full))
    if n > full * block_size:
        parts.append((full * block_size, n, 1))
    return parts


def _block_normalize(x: Tensor, block_size: int, absmax: Tensor) -> Tensor:
    """Write the block absmaxes of flat float32 ``x`` (N,) into ``absmax``; return x / absmax
    (a block of zeros divides by 1)."""
    xn = x.abs()                                           # (N,) |x|, then x / absmax
    row = 0
    for start, end, rows in _parts(x.numel(), block_size):
        a = absmax[row:row + rows]                         # (rows,)
        torch.amax(xn[start:end].view(rows, -1), dim=1, out=a)
        scale = a.masked_fill(a == 0, 1.0)                 # (rows,)
        torch.div(x[start:end].view(rows, -1), scale[:, None], out=xn[start:end].view(rows, -1))
        row += rows
    return xn


def _block_denormalize_(vals: Tensor, absmax: Tensor, block_size: int) -> Tensor:
    row = 0
    for start, end, rows in _parts(vals.numel(), block_size):
        vals[start:end].view(rows, -1).mul_(absmax[row:row + rows, None])
        row += rows
    return vals


def _encode(xn: Tensor, mids: Tensor) -> Tensor:
    """Nearest-value codes of normalised ``xn``: the midpoints strictly below (a tie goes to the
    lower value), i.e. ``torch.bucketize(xn, mids)`` (NaN: 15). On CPU
    with one of the cached maps' midpoints, the binary search per element (~15 ns, half of a
    4-bit step's time) is a lookup on the input's top 16 bits plus one comparison
    (:class:`memlab.quant._Codebook`, checked against bucketize when it is built): uint8
    codes; else bucketize's int32. The one difference: -inf gets 15 (bucketize: 0), and
    -inf is never a normalised value."""
    book = _BOOK_OF.get(id(mids))
    if book is None or book.lut is None or xn.device.type != "cpu" \
            or xn.dtype != torch.float32:
        return torch.bucketize(xn, mids, out_int32=True)
    x = xn.contiguous().view(-1)
    return book.encode(x, torch.empty(x.shape, dtype=torch.uint8, device=x.device)).view(xn.shape)


# ----------------------------------------------------------------------------------------------
# block-wise functions (public, validated)


def _check_block_size(block_size) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    return block_size


def quantize4_blockwise(x: Tensor, signed: bool = True,
                        block_size: int = 128) -> Tuple[Tensor, Tensor]:
    """4-bit block-wise quantization of ``x``: signed DE map (``signed=True``) or zero-free
    linear map (``signed=False``, for x >= 0). Returns (packed uint8 (ceil(N/2),), absmax
    float32 (ceil(N/block_size),))."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got "
                        f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")
    q = Q4Tensor.zeros(x.shape, signed, block_size, rank1=False, device=x.device)
    q.copy_(x)
    return q.codes, q.scale


def dequantize4_blockwise(packed: Tensor, absmax: Tensor, n: int, signed: bool = True,
                          block_size: int = 128) -> Tensor:
    """Inverse of :func:`quantize4_blockwise`: float32 (n,)."""
    return Q4Tensor(packed, absmax, (n,), signed, block_size, False).dequantize()


# ----------------------------------------------------------------------------------------------
# the quantized state type


@dataclass
class Q4Tensor:
    """A 4-bit quantized float tensor: the state type of :mod:`memlab.optim4bit`.

    ``codes``: uint8 (ceil(N/2),), two codes per byte; ``scale``: float32, the block absmaxes
    (ceil(N/block_size),) or, when ``rank1``, the per-axis maxima (sum of the dims > 1,).
    ``signed``: the signed DE map (first moment) or the zero-free linear map (second moment,
    x >= 0). A thin view: wrapping ``optimizer.state`` tensors costs nothing and ``copy_``
    writes into them.
    """

    codes: Tensor
    scale: Tensor
    shape: Tuple[int, ...]
    signed: bool = True
    block_size: int = 128
    rank1: bool = False

    def __post_init__(self):
        self.shape = tuple(self.shape)
        _check_block_size(self.block_size)
        n = math.prod(self.shape)
        if self.codes.dtype != torch.uint8 or self.codes.numel() != num_blocks(n, 2):
            raise ValueError(f"codes must be uint8 with ceil({n} / 2) = {num_blocks(n, 2)} "
                             f"elements for shape {self.shape}, got {self.codes.dtype} with "
                             f"{self.codes.numel()}")
        want = self.scale_numel(self.shape, self.block_size, self.rank1)
        if self.scale.dtype != torch.float32 or self.scale.numel() != want:
            what = "sum of the dims > 1" if self.rank1 else f"blocks of {self.block_size}"
            raise ValueError(f"scale must be float32 with {want} values ({what}), got "
                             f"{self.scale.dtype} with {self.scale.numel()}")
        if self.rank1 and len(_dims(self.shape)) < 2:
            raise ValueError(f"rank1 needs >= 2 dims of size > 1, got shape {self.shape}")

    @staticmethod
    def scale_numel(shape, block_size: int, rank1: bool) -> int:
        return sum(_dims(shape)) if rank1 else num_blocks(math.prod(shape), block_size)

    @classmethod
    def zeros(cls, shape, signed: bool = True, block_size: int = 128, rank1: bool = False,
              device=None) -> "Q4Tensor":
        shape, n = tuple(shape), math.prod(shape)
        z = _zero_code(signed)
        codes = torch.full((num_blocks(n, 2),), z | (z << 4), dtype=torch.uint8, device=device)
        scale = torch.zeros(cls.scale_numel(shape, block_size, rank1), dtype=torch.float32,
                            device=device)
        return cls(codes, scale, shape, signed, block_size, rank1)

    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + 4 * self.scale.numel()

    def dequantize(self) -> Tensor:
        """A new float32 tensor of ``shape``."""
        code, _ = _table(self.signed, self.codes.device)
        n = self.numel()
        vals = code.index_select(0, unpack4(self.codes, n).int())          # (N,) map values
        if self.rank1:
            return vals.view(self.shape).mul_(rank1_scale(self.scale, self.shape))
        return _block_denormalize_(vals, self.scale, self.block_size).view(self.shape)

    def copy_(self, x: Tensor, step: Optional[int] = None) -> "Q4Tensor":
        """Quantize ``x`` (``numel`` elements; >= 0 for the unsigned map) into this tensor's
        storages, in place: nearest values, or dithered at optimizer step ``step``
        (:func:`dither`)."""
        flat = x.detach().reshape(-1).to(torch.float32)                    # (N,)
        if flat.numel() != self.numel():
            raise ValueError(f"x must have {self.numel()} elements, got {flat.numel()}")
        if self.rank1:
            self.scale.copy_(rank1_maxes(flat.view(self.shape)))
            s = rank1_scale(self.scale, self.shape).reshape(-1)            # (N,)
            xn = flat / s.masked_fill(s == 0, 1.0)                         # (N,) in [-1, 1]
        else:
            xn = _block_normalize(flat, self.block_size, self.scale)       # (N,) in [-1, 1]
        pack4(_codes(xn, self.signed, 0, step), out=self.codes)
        return self


# ----------------------------------------------------------------------------------------------
# error rows (for ``memlab bench optim``: 4-bit against the 8-bit states)


def _errors(x: Tensor, x_hat: Tensor) -> dict:
    err, nz = (x_hat - x).abs(), x != 0
    return dict(value=(err.mean() / x.abs().mean()).item(),
                rel_error=(err[nz] / x[nz].abs()).mean().item(),
                zero_fraction=((x_hat == 0) & nz).float().mean().item())


def error_rows(exp_avg: Tensor, exp_avg_sq: Tensor, rank1_shape=None, eps: float = 1e-8) -> list:
    """Round-trip errors of Adam-like states (e.g. ``memlab.bench.optim.adam_like_states``) in
    the 4-bit formats against the 8-bit ones of ``memlab.optim`` (dynamic tree, blocks of 256,
    the second moment with its zero rule).

    ``quant_error`` rows: ``value`` = mean |x_hat - x| / mean |x|, ``rel_error`` = mean
    |x_hat - x| / |x| over x != 0, ``zero_fraction`` = share of non-zero x stored as 0; the
    second moment also with the unsigned 4-bit DE map (the zero-point problem the zero-free map
    avoids) and, when ``rank1_shape`` is given (default (N / 1024, 1024) when it divides), with
    rank-1 normalization of the state viewed as that matrix. ``update_error`` rows: ||u_hat - u||
    / ||u|| of Adam's direction u = m / (sqrt(v) + eps), 4-bit pair vs 8-bit pair.
    """
    from memlab.quant import QTensor                     # same layer: the 8-bit reference
    m = exp_avg.detach().reshape(-1).float()              # (N,)
    v = exp_avg_sq.detach().reshape(-1).float()           # (N,)
    n = m.numel()
    if rank1_shape is None and n % 1024 == 0 and n >= 2048:
        rank1_shape = (n // 1024, 1024)
    m4 = Q4Tensor.zeros((n,), True, 128).copy_(m).dequantize()
    m8 = QTensor.from_float(m, True, 256).dequantize()
    v4 = Q4Tensor.zeros((n,), False, 128).copy_(v).dequantize()
    v8 = QTensor.from_float(v, False, 256).dequantize()
    de_u = dynamic_exponent_map(False, 4)                 # unsigned DE, 4 bits: has a zero
    absmax = torch.empty(num_blocks(n, 128))
    vn = _block_normalize(v, 128, absmax)
    vde = _block_denormalize_(de_u[_encode(vn, (de_u[1:] + de_u[:-1]) / 2).long()], absmax, 128)
    res = {("exp_avg", "de4 block128"): (_errors(m, m4), "exp_avg dynamic8 block256"),
           ("exp_avg", "dynamic8 block256"): (_errors(m, m8), None),
           ("exp_avg_sq", "linear0-4 block128"): (_errors(v, v4), "exp_avg_sq dynamic8 block256"),
           ("exp_avg_sq", "de4 block128"): (_errors(v, vde), "exp_avg_sq dynamic8 block256"),
           ("exp_avg_sq", "dynamic8 block256"): (_errors(v, v8), None)}
    v4r = None
    if rank1_shape is not None and use_rank1(rank1_shape, 128, True):
        v4r = Q4Tensor.zeros(rank1_shape, False, 128, rank1=True).copy_(v.view(rank1_shape))
        v4r = v4r.dequantize().reshape(-1)
        res["exp_avg_sq", "linear0-4 rank1"] = (_errors(v, v4r), "exp_avg_sq dynamic8 block256")
    rows = []
    for (state, fmt), (e, ref) in res.items():
        ref_value = None if ref is None else res[state, ref.split(" ", 1)[1]][0]["value"]
        rows.append(dict(measure="quant_error", subject=f"{state} {fmt}",
                         value=round(e["value"], 5), unit="mean|err|/mean|x|", reference=ref,
                         reference_value=None if ref is None else round(ref_value, 5),
                         ratio=None if ref is None else round(e["value"] / ref_value, 4),
                         rel_error=round(e["rel_error"], 5),
                         zero_fraction=round(e["zero_fraction"], 6), numel=n))

    def direction(mm, vv):
        return mm / (vv.sqrt() + eps)
    u = direction(m, v)
    e8 = ((direction(m8, v8) - u).norm() / u.norm()).item()
    pairs = [("adam4bit block128", v4)] + ([("adam4bit rank1", v4r)] if v4r is not None else [])
    for name, vq in pairs:
        e4 = ((direction(m4, vq) - u).norm() / u.norm()).item()
        rows.append(dict(measure="update_error", subject=name, value=round(e4, 5),
                         unit="|u_hat-u|/|u|", reference="adam8bit", reference_value=round(e8, 5),
                         ratio=round(e4 / e8, 4), numel=n))
    return rows
