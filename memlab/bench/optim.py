"""8-bit optimizers, measured side by side with torch's fp32 ones.

What is measured (one row each, ``run(fast)`` returns the list):

* ``state_bytes_per_param`` -- bytes held in ``optimizer.state`` (each tensor storage counted
  once: uint8 codes, fp32 absmax, fp32 states, step tensors) divided by the number of parameter
  elements, over the tensors with at least ``min_8bit_size`` (4096) elements, after one step:
  SGD (momentum) and SGD8bit, Adam and Adam8bit. Reference: the fp32 optimizer; ratio = 8-bit /
  fp32 (the paper's "75% less optimizer-state memory" is ratio 0.25).
* ``step_time`` -- wall time of one ``optimizer.step()`` on the same parameters (ResNet-like conv
  and linear shapes, fixed random gradients; 4.18 M parameters, and in full mode also 33 M),
  median over repeats, the 8-bit optimizer, torch's fastest fp32 step (``fused=True``, which
  torch offers on CPU and CUDA; ``foreach`` where it does not) and torch's ``foreach`` step
  timed alternately in one process. ``reference`` is the fused step, ``foreach_value`` /
  ``foreach_ratio`` report the foreach one beside it and ``fused_vs_foreach`` (fused / foreach)
  is a load check: on an idle machine it is a property of the CPU, on a loaded one it drifts.
  ``range`` is (min, max) of our times. Rows: the default 8-bit optimizers (``path``:
  ``fused-c`` = the C kernel of :mod:`memlab._cpu_kernels` on CPU, ``compiled`` = torch.compile
  on CUDA, ``eager`` when neither is available) and, on CPU and the small size, the eager
  torch-op path of the same math (``sgd8bit-eager``, ``adam8bit-eager``: ``compile=False``).
  Reported in ms with the torch thread count and the device (CUDA too when present); the ratio
  is what to compare across machines.
* ``quant_error`` -- quantize -> dequantize error on Adam-like states (first and second moment of a
  simulated Adam run: per-element gradient scales log-normal, so heavy-tailed across elements),
  for the dynamic tree map vs the linear (int8) map, block-wise (256) vs per-tensor absmax
  (block_size = numel): ``value`` = mean |x_hat - x| / mean |x| (normalised absolute error),
  ``rel_error`` = mean |x_hat - x| / |x| over non-zero x. Reference: the linear map with the same
  blocking (for the dynamic rows) or per-tensor blocking with the same map (for the linear rows).
* ``drift_to_fp32`` -- distance to fp32 Adam after N steps on heavy-tailed gradients
  (:func:`drift_to_fp32`; per-element gradient scales log-normal with spread ``sigma``):
  ``value`` = ||p - p_fp32|| / ||p_fp32 - p_0||, ``zero_fraction`` = share of second moments
  stored as 0 while fp32 Adam's are not; memlab's fused and eager paths and, when installed,
  bitsandbytes' Adam8bit.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Optional

import torch

from memlab.optim import SGD8bit, Adam8bit
from memlab.quant import dequantize_blockwise, dynamic_map, linear_map, quantize_blockwise

MIN_8BIT = 4096


def _shapes(fast: bool) -> list:
    """ResNet-like parameter shapes: 3x3 convs per stage, a projection matrix, small vectors."""
    widths = (16, 32, 64, 128) if fast else (32, 64, 128, 256)
    shapes = [(c, c, 3, 3) for c in widths for _ in range(4)]             # conv weights
    shapes += [(widths[-1] * 8, 256), (256, 2048)]                        # pooling proj, head
    shapes += [(c,) for c in widths for _ in range(4)]                    # BN / bias vectors
    return shapes


ONE_TENSOR = 4_180_000        # the step_time rows' single tensor (as many elements as _shapes)


def _big_shapes() -> list:
    """~33 M parameters: a wider ResNet-like net (12.5 M in 3x3 convs) with large projections."""
    widths = (64, 128, 256, 512)
    shapes = [(c, c, 3, 3) for c in widths for _ in range(4)]
    shapes += [(4096, 2048), (2048, 4096), (1024, 3584)]
    shapes += [(c,) for c in widths for _ in range(4)]
    return shapes


def _dfresnet233_shapes() -> list:
    """The parameter shapes of the deep-speaker scenario's full-size twin (DF-ResNet233, width
    32, 5,994 speakers: 708 tensors, 11.7 M parameters, 483 of them below the 8-bit minimum):
    a real model's mix of a few large and many small tensors."""
    from memlab import scenarios
    from memlab.lab import Config, build_model
    twin = scenarios.get("deep-speaker").twin
    model = build_model(Config(task="speaker", **dict(twin.overrides)), num_classes=twin.num_classes)
    return [tuple(p.shape) for p in model.parameters()]


def _params(shapes, seed: int = 0) -> List[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.05) for s in shapes]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g) * 1e-2
    return ps


def _leaves(t: torch.Tensor):
    """The plain tensors behind ``t`` (tensor subclasses such as torchao's quantized states
    flatten into their inner tensors)."""
    if type(t) in (torch.Tensor, torch.nn.Parameter) or not hasattr(t, "__tensor_flatten__"):
        yield t
        return
    names, _ctx = t.__tensor_flatten__()
    for n in names:
        yield from _leaves(getattr(t, n))


def state_bytes_per_param(opt: torch.optim.Optimizer, params, min_numel: int = MIN_8BIT) -> float:
    """Bytes of the storages in ``opt.state`` for params with >= min_numel elements, per element
    (each storage once; tensor subclasses counted by their inner tensors)."""
    seen, total, numel = set(), 0, 0
    for p in params:
        if p.numel() < min_numel:
            continue
        numel += p.numel()
        for v in opt.state[p].values():
            if isinstance(v, torch.Tensor):
                for leaf in _leaves(v):
                    st = leaf.untyped_storage()
                    if st.data_ptr() not in seen:
                        seen.add(st.data_ptr())
                        total += st.nbytes()
    return total / max(numel, 1)


def _builders() -> Dict[str, Callable]:
    return {
        "sgd": lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9, foreach=True),
        "sgd8bit": lambda ps: SGD8bit(ps, lr=0.01, momentum=0.9),
        "adam": lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True),
        "adam8bit": lambda ps: Adam8bit(ps, lr=1e-3),
    }


def _fused_or_foreach(cls, **kw) -> Callable:
    """torch's fastest fp32 step: ``fused=True`` where this torch offers it (CPU since 2.4),
    else ``foreach=True``."""
    def make(ps):
        try:
            return cls(ps, fused=True, **kw)
        except (RuntimeError, TypeError, ValueError):
            return cls(ps, foreach=True, **kw)
    return make


def _timed_builders() -> Dict[str, Callable]:
    """The default 8-bit optimizers (fused C kernel on CPU when a compiler exists, torch.compile
    on CUDA), the eager torch-op path of the same math (``compile=False``), Adam4bit (its C step
    on CPU), and torch's fp32 steps: fused (the fastest) and foreach."""
    return {**_builders(),
            "sgd-fused": _fused_or_foreach(torch.optim.SGD, lr=0.01, momentum=0.9),
            "adam-fused": _fused_or_foreach(torch.optim.Adam, lr=1e-3),
            "sgd8bit-eager": lambda ps: SGD8bit(ps, lr=0.01, momentum=0.9, compile=False),
            "adam8bit-eager": lambda ps: Adam8bit(ps, lr=1e-3, compile=False),
            "adam4bit": _adam4bit}


def _adam4bit(ps):
    from memlab.optim4bit import Adam4bit
    return Adam4bit(ps, lr=1e-3)


PAIRS = (("sgd8bit", "sgd"), ("adam8bit", "adam"))
# (ours, torch's fastest, torch foreach)
TIMED = (("sgd8bit", "sgd-fused", "sgd"), ("sgd8bit-eager", "sgd-fused", "sgd"),
         ("adam8bit", "adam-fused", "adam"), ("adam8bit-eager", "adam-fused", "adam"),
         ("adam4bit", "adam-fused", "adam"))


def _memory_rows(shapes) -> list:
    rows, build, bpp = [], _builders(), {}
    for name, make in build.items():
        ps = _params(shapes)
        opt = make(ps)
        opt.step()
        bpp[name] = state_bytes_per_param(opt, ps)
    for name in build:
        ref = name.replace("8bit", "")
        rows.append(dict(measure="state_bytes_per_param", subject=name, value=round(bpp[name], 4),
                         unit="B/param", reference=ref, reference_value=round(bpp[ref], 4),
                         ratio=round(bpp[name] / bpp[ref], 4)))
    return rows


def _path(opt, device: str) -> str:
    """Which implementation ran the step: 'fused-c', 'compiled', 'eager', or torch's
    'torch-fused' / 'torch-foreach'; the 4-bit optimizers: 'fused-c' (memlab._q4_kernel) or
    'eager' (torch ops)."""
    from memlab.optim4bit import Adam4bit
    if isinstance(opt, Adam4bit):
        from memlab import _q4_kernel
        return "fused-c" if device == "cpu" and _q4_kernel.library() is not None else "eager"
    if not isinstance(opt, (SGD8bit, Adam8bit)):
        return "torch-fused" if opt.defaults.get("fused") else "torch-foreach"
    if opt._compile is None and device == "cpu":
        from memlab import _cpu_kernels
        return "fused-c" if _cpu_kernels.available() else "eager"
    if opt._compile is False:
        return "eager"
    return "compiled" if opt._compiled.get(device) else "eager"


def _time_rows(shapes, repeats: int, devices=None, eager: bool = True,
               label: str = "resnet-like") -> list:
    rows, build = [], _timed_builders()
    devices = devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    numel = sum(torch.Size(s).numel() for s in shapes)
    for device in devices:
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        for ours, fast, ref in TIMED:
            if ours.endswith("-eager") and (device == "cuda" or not eager):
                continue
            opts = {}
            for n in (ours, fast, ref):
                ps = [torch.nn.Parameter(p.detach().to(device)) for p in _params(shapes)]
                for p, q in zip(ps, _params(shapes)):
                    p.grad = q.grad.to(device)
                opts[n] = build[n](ps)
            times = {n: [] for n in opts}
            for n in opts:                          # warm-up: state creation, caches, compiling
                for _ in range(3):
                    opts[n].step()
                sync()
            for _ in range(repeats):                # alternate: all see the same machine load
                for n, opt in opts.items():
                    sync()
                    t0 = time.perf_counter()
                    opt.step()
                    sync()
                    times[n].append(time.perf_counter() - t0)
            a, b, c = (statistics.median(times[n]) * 1e3 for n in (ours, fast, ref))
            dev_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
            fast_path = _path(opts[fast], device)
            rows.append(dict(measure="step_time", subject=ours, value=round(a, 3), unit="ms",
                             reference=f"{ref}({fast_path.split('-')[1]})",
                             reference_value=round(b, 3), ratio=round(a / b, 3),
                             foreach_value=round(c, 3), foreach_ratio=round(a / c, 3),
                             fused_vs_foreach=round(b / c, 3),
                             range=(round(min(times[ours]) * 1e3, 3),
                                    round(max(times[ours]) * 1e3, 3)),
                             device=dev_name, path=_path(opts[ours], device),
                             threads=torch.get_num_threads() if device == "cpu" else None,
                             numel=numel, shapes=label, tensors=len(shapes)))
    return rows


def adam_like_states(n: int, steps: int = 30, seed: int = 0, betas=(0.9, 0.999)):
    """First and second moment after ``steps`` of Adam on synthetic gradients (n elements).

    Each element has its own gradient scale (log-normal, sigma 1.5: orders of magnitude apart,
    as across the weights of a network) and a small persistent mean; the gradient is that mean
    plus unit noise, times the scale. Returns (exp_avg, exp_avg_sq), float32 (n,).
    """
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(1.5 * torch.randn(n, generator=g))                  # (n,)
    mean = 0.3 * torch.randn(n, generator=g)                              # (n,)
    m, v = torch.zeros(n), torch.zeros(n)
    for _ in range(steps):
        grad = scale * (mean + torch.randn(n, generator=g))              # (n,)
        m.lerp_(grad, 1 - betas[0])
        v.mul_(betas[1]).addcmul_(grad, grad, value=1 - betas[1])
    return m, v


def heavy_tailed_gradients(n: int, steps: int, sigma: float = 1.5, seed: int = 0):
    """The gradient stream of :func:`drift_to_fp32`: ``steps`` float32 (n,) gradients, each
    element with its own log-normal scale (spread ``sigma``) and a small persistent mean, as in
    :func:`adam_like_states`. Deterministic in ``seed``; yields one gradient at a time."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(sigma * torch.randn(n, generator=g))                # (n,)
    mean = 0.3 * torch.randn(n, generator=g)                              # (n,)
    for _ in range(steps):
        yield scale * (mean + torch.randn(n, generator=g))               # (n,)


def _stored_second_moment(opt, p) -> Optional[torch.Tensor]:
    """Adam's second moment as the optimizer stores it (dequantized), for memlab's 8-bit
    optimizers, bitsandbytes' (``state2``/``absmax2``/``qmap2``) and fp32 ones; else None."""
    st = opt.state[p]
    if "exp_avg_sq_q4" in st:                                             # memlab 4-bit
        from memlab.optim4bit import stored_moments
        return stored_moments(opt, p)[1].reshape(-1)
    if "exp_avg_sq_codes" in st:
        from memlab.quant import QTensor
        return QTensor(st["exp_avg_sq_codes"], st["exp_avg_sq_absmax"], p.shape, False,
                       opt.param_groups[0]["block_size"]).dequantize().reshape(-1)
    if "state2" in st and "qmap2" in st:                                  # bitsandbytes
        codes, absmax = st["state2"].reshape(-1), st["absmax2"].reshape(-1)
        vals = st["qmap2"].float()[codes.long()]                          # (n,)
        block = -(-codes.numel() // absmax.numel())
        return (vals.view(-1, block) * absmax.float()[:, None]).reshape(-1)
    if "exp_avg_sq" in st:
        return st["exp_avg_sq"].reshape(-1).float()
    return None


def drift_to_fp32(make: Callable, sigma: float = 1.5, n: int = 2 ** 20, steps: int = 50,
                  seed: int = 0) -> dict:
    """How far an Adam variant drifts from fp32 Adam on the same heavy-tailed gradient stream.

    One parameter tensor of ``n`` elements (start ``0.05 * randn``), ``steps`` steps of ``make``
    (a function params -> optimizer) and of ``torch.optim.Adam`` at the same lr (``make``'s)
    fed identical gradients. Returns ``distance`` = ||p - p_fp32|| / ||p_fp32 - p_0|| (the
    drift in units of the whole fp32 update) and ``zero_fraction`` = the share of elements whose
    stored second moment is 0 while fp32 Adam's is not (each such element steps by
    m / eps instead of m / sqrt(v)).
    """
    p0 = 0.05 * torch.randn(n, generator=torch.Generator().manual_seed(seed + 1))  # (n,)
    p = torch.nn.Parameter(p0.clone())
    ref = torch.nn.Parameter(p0.clone())
    opt = make([p])
    lr = opt.param_groups[0]["lr"]
    ref_opt = torch.optim.Adam([ref], lr=lr, foreach=False)
    for grad in heavy_tailed_gradients(n, steps, sigma, seed):
        p.grad, ref.grad = grad.clone(), grad.clone()
        opt.step()
        ref_opt.step()
    with torch.no_grad():
        distance = ((p - ref).norm() / (ref - p0).norm()).item()
    v_hat, v_ref = _stored_second_moment(opt, p), ref_opt.state[ref]["exp_avg_sq"]
    zeros = None if v_hat is None else ((v_hat == 0) & (v_ref > 0)).float().mean().item()
    return dict(distance=distance, zero_fraction=zeros)


def nearest_zero_fraction(sigma: float = 1.5, n: int = 2 ** 20, steps: int = 50,
                          seed: int = 0, betas=(0.9, 0.999)) -> float:
    """Share of fp32 Adam's (positive) second moments that plain nearest rounding to the
    unsigned dynamic map (blocks of 256) would store as 0, on :func:`heavy_tailed_gradients`:
    what the zero rule of :class:`memlab.quant.QTensor` prevents."""
    v = torch.zeros(n)
    for grad in heavy_tailed_gradients(n, steps, sigma, seed):
        v.mul_(betas[1]).addcmul_(grad, grad, value=1 - betas[1])
    codes, _ = quantize_blockwise(v, dynamic_map(False), 256)
    return ((codes == 0) & (v > 0)).float().mean().item()


def drift_makers() -> Dict[str, Callable]:
    """The Adam variants :func:`drift_rows` compares: memlab's (fused and eager paths) and,
    when installed, bitsandbytes' and torchao's 8-bit Adam (CPU)."""
    makers = {"adam8bit": lambda ps: Adam8bit(ps, lr=1e-3),
              "adam8bit-eager": lambda ps: Adam8bit(ps, lr=1e-3, compile=False)}
    try:
        import bitsandbytes as bnb  # noqa: F401
        makers["bitsandbytes"] = lambda ps: bnb.optim.Adam8bit(ps, lr=1e-3)
    except Exception:  # not installed, or no CPU backend
        pass
    return makers


def drift_rows(sigmas=(0.5, 1.0, 1.5, 2.0), n: int = 2 ** 20, steps: int = 50,
               names: Optional[List[str]] = None) -> List[dict]:
    """``drift`` rows: :func:`drift_to_fp32` per Adam variant and spread of gradient scales."""
    makers = drift_makers()
    rows = []
    for name in names or list(makers):
        for sigma in sigmas:
            r = drift_to_fp32(makers[name], sigma=sigma, n=n, steps=steps)
            rows.append(dict(measure="drift_to_fp32", subject=name, sigma=sigma, steps=steps,
                             value=round(r["distance"], 4), unit="|p-p32|/|dp32|",
                             zero_fraction=None if r["zero_fraction"] is None
                             else round(r["zero_fraction"], 5), numel=n))
    return rows


def quant_error(x: torch.Tensor, code: torch.Tensor, block_size: int) -> tuple:
    """(mean |x_hat - x| / mean |x|, mean |x_hat - x| / |x| over x != 0) of a round trip."""
    codes, absmax = quantize_blockwise(x, code, block_size)
    err = (dequantize_blockwise(codes, absmax, code, block_size, shape=x.shape) - x).abs()
    nz = x != 0
    return (err.mean() / x.abs().mean()).item(), (err[nz] / x[nz].abs()).mean().item()


def relative_errors(x: torch.Tensor, code: torch.Tensor, block_size: int) -> torch.Tensor:
    """|x_hat - x| / |x| of a quantize -> dequantize round trip, for the non-zero elements of x
    (float32, flat): the per-element errors whose histogram the notebook draws."""
    codes, absmax = quantize_blockwise(x, code, block_size)
    x_hat = dequantize_blockwise(codes, absmax, code, block_size, shape=x.shape)
    nz = x != 0
    return ((x_hat - x).abs()[nz] / x[nz].abs()).reshape(-1)


def state_memory(fast: bool = False, names=("sgd", "sgd8bit", "adam", "adam8bit")) -> List[dict]:
    """Optimizer-state memory of each optimizer on the ResNet-like parameters of ``_shapes``.

    The first ``step()`` (which creates the state) runs inside a ``MemoryMeter``; per row:
    ``state_bytes`` -- the optimizer category alive after the step (what the meter counts as
    ``optimizer``), ``step_peak_bytes`` -- that category's maximum during the step (includes the
    8-bit optimizers' fp32 working pieces), ``state_nbytes`` -- the storages in
    ``optimizer.state`` counted directly (must equal ``state_bytes``), and
    ``bytes_per_param`` = state_bytes / parameter elements (all tensors, small ones included).
    """
    from memlab.memory import MemoryMeter
    from memlab.quant import QTensor

    for signed in (True, False):  # the codebooks are a global cache (~0.3 MiB each), built at
        QTensor.zeros((1,), signed)  # first use: build them outside the metered step
    build, rows = _builders(), []
    for name in names:
        ps = _params(_shapes(fast))
        opt = build[name](ps)
        with MemoryMeter("cpu", optimizer=opt) as meter:
            opt.step()
        numel = sum(p.numel() for p in ps)
        direct = state_bytes_per_param(opt, ps, min_numel=0) * numel
        rows.append(dict(optimizer=name, params=numel, state_bytes=meter.now()["optimizer"],
                         step_peak_bytes=meter.category_peaks()["optimizer"],
                         state_nbytes=int(round(direct)),
                         bytes_per_param=round(meter.now()["optimizer"] / numel, 4)))
    return rows


def error_rows(n: int) -> list:
    """quant_error rows for Adam-like states of n elements: both maps x both blockings."""
    m, v = adam_like_states(n)
    res = {}
    for state, x, signed in (("exp_avg", m, True), ("exp_avg_sq", v, False)):
        for mname, code in (("dynamic", dynamic_map(signed)), ("linear", linear_map(signed))):
            for blocking, bs in (("block256", 256), ("tensor", x.numel())):
                res[state, mname, blocking] = quant_error(x, code, bs)
    rows = []
    for (state, mname, blocking), (abs_err, rel_err) in res.items():
        ref = (state, "linear", blocking) if mname == "dynamic" else (state, mname, "tensor")
        if ref == (state, mname, blocking):
            ref_err = None
        else:
            ref_err = res[ref][0]
        rows.append(dict(measure="quant_error", subject=f"{state} {mname} {blocking}",
                         value=round(abs_err, 5), unit="mean|err|/mean|x|",
                         reference=" ".join(ref) if ref_err is not None else None,
                         reference_value=None if ref_err is None else round(ref_err, 5),
                         ratio=None if ref_err is None else round(abs_err / ref_err, 4),
                         rel_error=round(rel_err, 5)))
    return rows


def step_times(fast: bool = False, repeats: Optional[int] = None,
               threads: Optional[int] = None) -> List[dict]:
    """The ``step_time`` rows only: each 8-bit optimizer against torch's fastest fp32 step
    (``fused``), with its ``foreach`` step beside it; in full mode also on ~33 M parameters
    (:func:`_big_shapes`; the 8-bit defaults only, not the slow eager path), on one
    tensor of 4.18 M (``shapes="one tensor"``: the kernel without per-tensor overhead) and on
    the parameters of a DF-ResNet233 (``shapes="DF-ResNet233"``: 708 tensors, most of them
    small, where the per-tensor overhead shows).

    ``threads``: torch intra-op threads for the timings (default: leave torch's setting);
    on a busy machine ``threads=1`` gives steadier ratios.
    """
    repeats = repeats or (5 if fast else 15)
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        rows = _time_rows(_shapes(fast), repeats)
        if not fast:
            rows += _time_rows(_big_shapes(), max(5, repeats // 3), eager=False,
                               label="33M resnet-like")
            rows += _time_rows([(ONE_TENSOR,)], 2 * repeats, eager=False, label="one tensor")
            rows += _time_rows(_dfresnet233_shapes(), max(5, repeats // 3), eager=False,
                               label="DF-ResNet233")
        return rows
    finally:
        torch.set_num_threads(before)


def four_bit_rows(fast: bool = False) -> List[dict]:
    """4-bit Adam (memlab.optim4bit, Li et al. 2023) beside 8-bit and fp32: state bytes per
    parameter on the ``_shapes`` parameters, round-trip errors of Adam-like states
    (memlab.quant4.error_rows) and the drift to fp32 Adam on heavy-tailed gradients."""
    from memlab.optim4bit import Adam4bit
    from memlab.quant4 import error_rows as error_rows_4bit
    shapes = _shapes(fast)
    rows = []
    bpp = {}
    for name, make in (("adam", lambda ps: torch.optim.Adam(ps, lr=1e-3)),
                       ("adam8bit", lambda ps: Adam8bit(ps, lr=1e-3)),
                       ("adam4bit", lambda ps: Adam4bit(ps, lr=1e-3))):
        ps = _params(shapes)
        opt = make(ps)
        opt.step()
        bpp[name] = state_bytes_per_param(opt, ps)
    for name in ("adam8bit", "adam4bit"):
        rows.append(dict(measure="state_bytes_per_param", subject=name, value=round(bpp[name], 4),
                         unit="B/param", reference="adam", reference_value=round(bpp["adam"], 4),
                         ratio=round(bpp[name] / bpp["adam"], 4)))
    n = 2 ** 14 if fast else 2 ** 18
    rows += [dict(r, subject=f"4bit: {r.get('subject')}") for r in
             error_rows_4bit(*adam_like_states(n))]
    for sigma in (0.5, 1.5):
        d = drift_to_fp32(lambda ps: Adam4bit(ps, lr=1e-3, min_4bit_size=0), sigma=sigma, n=n,
                          steps=10 if fast else 50)
        rows.append(dict(measure="drift_to_fp32", subject="adam4bit", sigma=sigma,
                         value=round(d["distance"], 4), unit="|p-p32|/|dp32|",
                         zero_fraction=d["zero_fraction"], numel=n))
    return rows


def run(fast: bool = False, repeats: Optional[int] = None,
        threads: Optional[int] = None) -> List[dict]:
    """All rows: state bytes/param, step time vs torch (fused, foreach beside),
    quantization error, drift to fp32 Adam, the loss curves' gaps to fp32 Adam
    (:mod:`memlab.bench.curves`)."""
    times = step_times(fast, repeats, threads)
    drift = drift_rows(sigmas=(0.5, 1.5) if fast else (0.5, 1.0, 1.5, 2.0),
                       n=2 ** 16 if fast else 2 ** 20, steps=20 if fast else 50)
    from memlab.bench.curves import curve_rows
    return (_memory_rows(_shapes(fast)) + times + error_rows(2 ** 16 if fast else 2 ** 20)
            + drift + four_bit_rows(fast) + curve_rows(fast))


if __name__ == "__main__":  # pragma: no cover
    import os
    import sys
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else None
    for row in run(fast=os.environ.get("MEMLAB_FAST") == "1", threads=threads):
        print(row)
