"""Peers: memlab's techniques side by side with the fastest implementations installed here.

One row per (workload, implementation). Every row is first checked for the same result as a
reference (``check``: what was compared and the largest difference; a row that fails its check
is reported with ``ok=False`` and not timed), then timed round-robin with the other rows of its
workload in one process, so load on the machine affects them alike. ``ratio`` is the row's
median time over the workload's ``baseline`` row. Peers that are not installed are listed in
one row each with ``status="missing"`` (install them with ``pip install -e ".[peers]"``).

Workloads:

* ``adam-step`` / ``sgd-step``: one optimizer step on ResNet-like parameters (``optim`` bench
  shapes: 4.18 M parameters; fast mode 0.26 M). Baseline: torch's fastest fp32 step
  (``fused=True``); beside it torch ``foreach``, memlab Adam8bit / SGD8bit, bitsandbytes,
  torchao (AdamW8bit; its first step compiles, excluded from the timing). Check: after the same
  3 steps from the same start, the parameters' distance to fp32's, relative to fp32's update
  (an 8-bit optimizer is not bit-equal to fp32: the check bounds it at 5%).
* ``reversible-stage``: forward + backward of a stage of ``depth`` (8 and 32; fast: 2 and 4)
  additive couplings on a (B, C, H, W) batch, for two kinds of F and G on half the channels
  (``coupling``): ``conv`` (3x3 conv, ReLU, 3x3 conv: the ResNet block) and ``bottleneck``
  (1x1 conv to 4x, ReLU, depthwise 3x3, ReLU, 1x1 conv: the DF-ResNet block's shape).
  Baseline: the same couplings under plain autograd (keeps every activation); memlab
  ``ReversibleSequence``, revlib ``ReversibleSequential``, memcnn ``InvertibleModuleWrapper``.
  Check: loss and every parameter gradient against plain autograd (relative 1e-4).
* ``rnnt-loss``: RNN-T loss + joiner forward and backward (B x T x U x V, H-dim joiner).
  Baseline: torchaudio's batched loss (``memlab.transducer.rnnt_loss_batched``); memlab's
  sample-wise loss, and ``optimized_transducer`` / ``fast_rnnt`` when installed. Check: loss,
  joiner and encoder gradients in float32 on a few utterances of the batch against memlab's
  float64 reference lattice (relative 1e-3: torchaudio's own gradients are 2.5e-4 off).
* ``rnnt-pruned``: the pruned RNN-T loss (0.5 x simple + pruned, ``s_range`` 5) on the same
  workload, with the two simple projections. Baseline: memlab's batched ``pruned_rnnt_loss``;
  its sample-wise form, and ``fast_rnnt``'s pipeline (k2/icefall's) when installed. Check: each
  with the whole lattice as its band (``s_range = U + 1``) against the float64 exact value.
"""

from __future__ import annotations

import copy
import importlib
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

PEERS = ("bitsandbytes", "torchao", "revlib", "memcnn", "optimized_transducer", "fast_rnnt")


def _have(name: str) -> bool:
    try:
        importlib.import_module(name)
        return True
    except Exception:  # noqa: BLE001 - not installed, or fails to import on this machine
        return False


def _time_round_robin(fns: Dict[str, Callable[[], None]], repeats: int) -> Dict[str, list]:
    times = {n: [] for n in fns}
    for _ in range(repeats):
        for n, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[n].append(time.perf_counter() - t0)
    return times


def _rows(workload: str, times: Dict[str, list], baseline: str, checks: Dict[str, dict],
          extra: Dict[str, dict]) -> List[dict]:
    base = statistics.median(times[baseline])
    rows = []
    for n, ts in times.items():
        med = statistics.median(ts)
        rows.append(dict(workload=workload, subject=n, ms=round(med * 1e3, 3),
                         ms_min=round(min(ts) * 1e3, 3), ms_max=round(max(ts) * 1e3, 3),
                         ratio=round(med / base, 3), baseline=baseline, ok=True,
                         threads=torch.get_num_threads(), **checks.get(n, {}),
                         **extra.get(n, {})))
    for n, c in checks.items():
        if n not in times:                      # failed its check: reported, not timed
            rows.append(dict(workload=workload, subject=n, ok=False, baseline=baseline, **c))
    return rows


# ----------------------------------------------------------------------------- optimizers
def _optim_makers(kind: str) -> Dict[str, Callable]:
    from memlab.optim import Adam8bit, SGD8bit
    if kind == "adam":
        makers = {"torch-fused": lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True),
                  "torch-foreach": lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True),
                  "memlab-adam8bit": lambda ps: Adam8bit(ps, lr=1e-3)}
        if _have("bitsandbytes"):
            import bitsandbytes as bnb
            makers["bitsandbytes-adam8bit"] = lambda ps: bnb.optim.Adam8bit(ps, lr=1e-3)
        if _have("torchao"):
            from torchao.optim import AdamW8bit
            makers["torchao-adamw8bit"] = lambda ps: AdamW8bit(ps, lr=1e-3, weight_decay=0.0)
        return makers
    makers = {"torch-fused": lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9, fused=True),
              "torch-foreach": lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9,
                                                          foreach=True),
              "memlab-sgd8bit": lambda ps: SGD8bit(ps, lr=0.01, momentum=0.9)}
    if _have("bitsandbytes"):
        import bitsandbytes as bnb
        makers["bitsandbytes-sgd8bit"] = lambda ps: bnb.optim.SGD8bit(ps, lr=0.01, momentum=0.9)
    return makers


def optimizer_rows(kind: str = "adam", fast: bool = False, repeats: int = 5,
                   names: Optional[List[str]] = None) -> List[dict]:
    """``adam-step`` / ``sgd-step`` rows (see the module docstring)."""
    from memlab.bench.optim import _params, _shapes, state_bytes_per_param
    shapes = _shapes(fast)
    makers = _optim_makers(kind)
    if names is not None:
        makers = {n: m for n, m in makers.items() if n in names or n == "torch-fused"}
    ref_params = _params(shapes)
    start = [p.detach().clone() for p in ref_params]
    grads = [p.grad.clone() for p in ref_params]
    built, checks, extra = {}, {}, {}
    for name, make in makers.items():
        ps = [nn.Parameter(s.clone()) for s in start]
        opt = make(ps)
        for _ in range(3):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
        built[name] = (ps, opt)
        extra[name] = dict(state_bytes_per_param=round(state_bytes_per_param(opt, ps), 4),
                           numel=sum(p.numel() for p in ps))
    ref_ps = built["torch-fused"][0]
    update = torch.cat([(r - s).reshape(-1) for r, s in zip(ref_ps, start)]).norm()
    for name, (ps, _opt) in built.items():
        dist = torch.cat([(p - r).reshape(-1) for p, r in zip(ps, ref_ps)]).norm() / update
        checks[name] = dict(check="|p - p_fp32| / |dp_fp32| after 3 steps",
                            max_diff=round(dist.item(), 5))
    timed = {n: (lambda opt=opt: opt.step()) for n, (_p, opt) in built.items()
             if checks[n]["max_diff"] <= 0.05}
    times = _time_round_robin(timed, repeats)
    return _rows(f"{kind}-step", times, "torch-fused", checks, extra)


# ----------------------------------------------------------------------------- reversible
class _Half(nn.Module):
    """F or G of a coupling: 3x3 conv, ReLU, 3x3 conv on ``c`` channels."""

    def __init__(self, c: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(c, c, 3, padding=1))

    def forward(self, x):
        return self.net(x)


def _half_bottleneck(c: int) -> nn.Module:
    """F or G of an inverted-bottleneck coupling (the DF-ResNet block's shape, without its
    BatchNorms, whose running statistics the peers update differently): 1x1 conv to 4c, ReLU,
    depthwise 3x3, ReLU, 1x1 conv back to c."""
    return nn.Sequential(nn.Conv2d(c, 4 * c, 1), nn.ReLU(),
                         nn.Conv2d(4 * c, 4 * c, 3, padding=1, groups=4 * c), nn.ReLU(),
                         nn.Conv2d(4 * c, c, 1))


COUPLINGS = {"conv": _Half, "bottleneck": _half_bottleneck}


class _Plain(nn.Module):
    """The couplings under plain autograd: y1 = x1 + f(x2); y2 = x2 + g(y1)."""

    def __init__(self, pairs):
        super().__init__()
        self.pairs = nn.ModuleList(nn.ModuleList(p) for p in pairs)

    def forward(self, x):
        for f, g in self.pairs:
            x1, x2 = x.chunk(2, dim=1)
            y1 = x1 + f(x2)
            x = torch.cat([y1, x2 + g(y1)], dim=1)
        return x


def _stage_nets(depth: int, channels: int, coupling: str = "conv") -> Dict[str, nn.Module]:
    from memlab.reversible import AdditiveCoupling, ReversibleSequence
    torch.manual_seed(0)
    half = COUPLINGS[coupling]
    pairs = [(half(channels // 2), half(channels // 2)) for _ in range(depth)]
    nets = {"plain-autograd": _Plain(copy.deepcopy(pairs)),
            "memlab-reversible": ReversibleSequence(
                [AdditiveCoupling(*copy.deepcopy(p)) for p in pairs])}
    if _have("revlib"):
        import revlib
        mods = [m for p in copy.deepcopy(pairs) for m in p]
        nets["revlib"] = revlib.ReversibleSequential(*mods, split_dim=1)
    if _have("memcnn"):
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import memcnn
        nets["memcnn"] = nn.Sequential(*[memcnn.InvertibleModuleWrapper(
            memcnn.AdditiveCoupling(*copy.deepcopy(p)), keep_input=False,
            keep_input_inverse=False) for p in pairs])
    return nets


def reversible_rows(depths=(8, 32), couplings=("conv", "bottleneck"), channels: int = 64,
                    size: int = 16, batch: int = 2, repeats: int = 5) -> List[dict]:
    """``reversible-stage`` rows (see the module docstring), for every coupling and depth."""
    rows = []
    for coupling in couplings:
        for depth in depths:
            rows += _reversible_rows(depth, coupling, channels, size, batch, repeats)
    return rows


def _reversible_rows(depth: int, coupling: str, channels: int, size: int, batch: int,
                     repeats: int) -> List[dict]:
    nets = _stage_nets(depth, channels, coupling)
    x0 = torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(1))

    def step(net):
        net.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        loss = net(x).square().mean()
        loss.backward()
        return loss.detach(), [p.grad for p in net.parameters()]

    ref_loss, ref_grads = step(nets["plain-autograd"])
    checks, timed = {}, {}
    for name, net in nets.items():
        loss, grads = step(net)
        diff = max([(abs(loss - ref_loss) / ref_loss.abs()).item()] +
                   [((g - r).norm() / r.norm().clamp_min(1e-30)).item()
                    for g, r in zip(grads, ref_grads)])
        checks[name] = dict(check="loss and parameter gradients vs plain autograd (relative)",
                            max_diff=float(f"{diff:.3g}"), depth=depth, coupling=coupling)
        if diff <= 1e-4:
            timed[name] = (lambda net=net: step(net))
    times = _time_round_robin(timed, repeats)
    return _rows("reversible-stage", times, "plain-autograd", checks, {})


# ----------------------------------------------------------------------------- transducer
class _Joiner(nn.Module):
    """out(tanh(enc[t] + pred[u])): (b, T, H), (b, U+1, H) -> (b, T, U+1, V)."""

    def __init__(self, H: int, V: int):
        super().__init__()
        self.out = nn.Linear(H, V)

    def forward(self, e, p):
        return self.out(torch.tanh(e[:, :, None] + p[:, None]))


def rnnt_rows(B: int = 32, T: int = 200, U: int = 40, V: int = 512, H: int = 128,
              repeats: int = 3, check_batch: int = 4) -> List[dict]:
    """``rnnt-loss`` rows (see the module docstring). Check: each implementation in float32 on
    the first ``check_batch`` utterances (the full T, U, V) against memlab's float64 reference
    lattice (``rnnt_loss_reference``), not against the baseline: torchaudio's own gradients are
    2e-4 off the exact ones at T=200, U=40, even for float64 inputs."""
    from memlab.transducer import rnnt_loss_batched, rnnt_loss_reference, samplewise_rnnt_loss
    g = torch.Generator().manual_seed(0)
    enc = torch.randn(B, T, H, generator=g)
    pred = torch.randn(B, U + 1, H, generator=g)
    targets = torch.randint(1, V, (B, U), generator=g)
    el = torch.full((B,), T, dtype=torch.long)
    tl = torch.full((B,), U, dtype=torch.long)
    join = _Joiner(H, V)

    impls = {"torchaudio-batched": lambda j, e, p, y, n, m: rnnt_loss_batched(
                 j(e, p), y, n, m, reduction="sum", kernel="torchaudio"),
             "memlab-samplewise": lambda j, e, p, y, n, m: samplewise_rnnt_loss(
                 j, e, p, y, n, m, reduction="sum")}
    if _have("optimized_transducer"):
        import optimized_transducer as ot

        def _ot(j, e, p, y, n, m):
            return ot.transducer_loss(logits=j(e, p).reshape(-1, V), targets=y.int(),
                                      logit_lengths=n.int(), target_lengths=m.int(),
                                      blank=0, reduction="sum", from_log_softmax=False)
        impls["optimized_transducer"] = _ot
    if _have("fast_rnnt"):
        import fast_rnnt

        def _fr(j, e, p, y, n, m):
            bnd = torch.zeros(e.shape[0], 4, dtype=torch.long)
            bnd[:, 2], bnd[:, 3] = m, n
            return fast_rnnt.rnnt_loss(logits=j(e, p), symbols=y, termination_symbol=0,
                                       boundary=bnd, reduction="sum")
        impls["fast_rnnt"] = _fr

    def ref(j, e, p, y, n, m):
        return rnnt_loss_reference(j(e, p), y, n, m, reduction="sum")
    return _loss_rows("rnnt-loss", impls, "torchaudio-batched", ref, None, join, [join.out],
                      (enc, pred, targets, el, tl), repeats, check_batch)


def _loss_rows(workload: str, impls: Dict[str, Callable], baseline: str, reference: Callable,
               checked: Optional[Callable], join: nn.Module, leaves: List[nn.Module], data: tuple,
               repeats: int, check_batch: int) -> List[dict]:
    """Check every ``impls[name](join, enc, pred, targets, enc_lengths, target_lengths)`` in
    float32 on the first ``check_batch`` utterances against ``reference`` (float64): the loss
    and the gradients of ``leaves``' weights and of the encoder output (``checked``: the impl
    name -> the impl run for the check, None: the timed one); meter and time the ones that
    pass."""
    from memlab.memory import MemoryMeter
    enc, pred, targets, el, tl = data
    B = enc.shape[0]
    names = [n for n, m in join.named_modules() if any(m is x for x in leaves)]

    def step(fn, j=join, b=B, dtype=torch.float32):
        j.zero_grad(set_to_none=True)
        e = enc[:b].to(dtype).clone().requires_grad_()
        p = pred[:b].to(dtype).clone().requires_grad_()
        loss = fn(j, e, p, targets[:b], el[:b], tl[:b])
        loss.backward()
        mods = dict(j.named_modules())
        return loss.detach().double(), ([mods[n].weight.grad.double() for n in names]
                                        + [e.grad.double()])

    b = min(B, check_batch)
    ref_loss, ref_grads = step(reference, copy.deepcopy(join).double(), b, torch.float64)
    checks, timed, extra = {}, {}, {}
    for name, fn in impls.items():
        loss, grads = step(checked(name, fn) if checked else fn, b=b)
        diff = max([(abs(loss - ref_loss) / ref_loss.abs()).item()] +
                   [((a - r).norm() / r.norm()).item() for a, r in zip(grads, ref_grads)])
        checks[name] = dict(check=f"loss, joiner and encoder gradients (float32, {b} utterances)"
                                  f" vs the float64 reference lattice (relative)",
                            max_diff=float(f"{diff:.3g}"))
        with MemoryMeter("cpu", model=join, inputs=[enc, pred]) as meter:
            step(fn)
        extra[name] = dict(peak_mib=round((meter.peak - meter.baseline) / 2 ** 20, 1))
        if diff <= RNNT_TOLERANCE:
            timed[name] = (lambda fn=fn: step(fn))
    times = _time_round_robin(timed, repeats)
    return _rows(workload, times, baseline, checks, extra)


class _PrunedJoiner(_Joiner):
    """_Joiner with the two "simple" projections to the vocabulary of the pruned loss."""

    def __init__(self, H: int, V: int):
        super().__init__(H, V)
        self.am_proj, self.lm_proj = nn.Linear(H, V), nn.Linear(H, V)


def rnnt_pruned_rows(B: int = 32, T: int = 200, U: int = 40, V: int = 512, H: int = 128,
                     s_range: int = 5, repeats: int = 3, check_batch: int = 4) -> List[dict]:
    """``rnnt-pruned`` rows: 0.5 x the simple loss + the pruned loss (``s_range`` symbols a
    frame), forward and backward, on the ``rnnt-loss`` workload. Baseline: memlab's batched
    ``pruned_rnnt_loss``; its sample-wise form; ``fast_rnnt``'s pipeline when installed, as
    icefall runs it (``rnnt_loss_simple`` with its gradients, ``get_rnnt_prune_ranges``,
    ``do_rnnt_pruning``, the joiner on the band, ``rnnt_loss_pruned``). The two pick their
    windows by different rules, so the check runs each at ``s_range = U + 1`` (the band is the
    whole lattice: the exact value, 0.5 x simple + the full RNN-T loss, float64 reference)."""
    from memlab.pruned import pruned_rnnt_loss, simple_rnnt_loss
    from memlab.transducer import rnnt_loss_reference
    g = torch.Generator().manual_seed(0)
    enc, pred = torch.randn(B, T, H, generator=g), torch.randn(B, U + 1, H, generator=g)
    targets = torch.randint(1, V, (B, U), generator=g)
    el, tl = torch.full((B,), T, dtype=torch.long), torch.full((B,), U, dtype=torch.long)
    join = _PrunedJoiner(H, V)

    def memlab_pruned(S, samplewise):
        return lambda j, e, p, y, n, m: pruned_rnnt_loss(
            j, e, p, j.am_proj, j.lm_proj, y, n, m, s_range=S, reduction="sum",
            simple_loss_scale=0.5, samplewise=samplewise)
    variants = {"memlab-pruned": lambda S: memlab_pruned(S, False),   # name -> s_range -> impl
                "memlab-samplewise-pruned": lambda S: memlab_pruned(S, True)}
    if _have("fast_rnnt"):
        import fast_rnnt

        def fast(S):
            def run(j, e, p, y, n, m):
                bnd = torch.zeros(e.shape[0], 4, dtype=torch.long)
                bnd[:, 2], bnd[:, 3] = m, n
                simple, (px_g, py_g) = fast_rnnt.rnnt_loss_simple(
                    lm=j.lm_proj(p), am=j.am_proj(e), symbols=y, termination_symbol=0,
                    boundary=bnd, reduction="sum", return_grad=True)
                ranges = fast_rnnt.get_rnnt_prune_ranges(px_grad=px_g, py_grad=py_g,
                                                         boundary=bnd, s_range=S)
                e_band, p_band = fast_rnnt.do_rnnt_pruning(am=e, lm=p, ranges=ranges)
                logits = j.out(torch.tanh(e_band + p_band))              # (b, T, S, V)
                return 0.5 * simple + fast_rnnt.rnnt_loss_pruned(
                    logits=logits, symbols=y, ranges=ranges, termination_symbol=0,
                    boundary=bnd, reduction="sum")
            return run
        variants["fast_rnnt-pruned"] = fast
    impls = {name: make(s_range) for name, make in variants.items()}

    def exact(j, e, p, y, n, m):
        return (0.5 * simple_rnnt_loss(j.am_proj(e), j.lm_proj(p), y, n, m, reduction="sum")
                + rnnt_loss_reference(j(e, p), y, n, m, reduction="sum"))
    rows = _loss_rows("rnnt-pruned", impls, "memlab-pruned", exact,
                      lambda name, fn: variants[name](U + 1), join,
                      [join.out, join.am_proj], (enc, pred, targets, el, tl), repeats,
                      check_batch)
    for r in rows:
        r["s_range"] = s_range
    return rows


# torchaudio's float32 gradients are ~2.5e-4 off the exact ones at T=200, U=40 (memlab's
# sample-wise loss: 3e-7): a peer within 1e-3 computes the same loss
RNNT_TOLERANCE = 1e-3


# ----------------------------------------------------------------------------- all
def run(fast: bool = False, threads: Optional[int] = None) -> List[dict]:
    """Every workload against the peers installed here (fast: tiny sizes, seconds)."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        rows = optimizer_rows("adam", fast, repeats=3 if fast else 7)
        rows += optimizer_rows("sgd", fast, repeats=3 if fast else 7)
        rows += reversible_rows(**(dict(depths=(2, 4), channels=16, size=8, repeats=2) if fast
                                   else {}))
        rows += rnnt_rows(**(dict(B=4, T=20, U=5, V=32, H=16, repeats=2) if fast else {}))
        rows += rnnt_pruned_rows(**(dict(B=4, T=20, U=5, V=32, H=16, repeats=2) if fast
                                    else {}))
        rows += [dict(workload="-", subject=p, status="missing") for p in PEERS if not _have(p)]
        keys = list(dict.fromkeys(k for r in rows for k in r))      # one table: every column
        return [{k: r.get(k) for k in keys} for r in rows]
    finally:
        torch.set_num_threads(before)
