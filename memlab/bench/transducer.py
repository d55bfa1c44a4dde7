"""Benchmark: batched vs sample-wise transducer loss -- peak memory and time of one loss step.

What is measured. The loss step alone, side by side in one process: given an encoder output
(B, T, H) and a predictor output (B, U+1, H) as leaf tensors that require grad, and a Joiner
(H -> joint_dim -> tanh -> V, as in ``memlab.models.transducer.Joiner``), one call of the loss
and ``loss.backward()``: the joiner, the loss, and the gradients of the encoder/predictor outputs
and of the joiner's parameters. The encoder and predictor are not run: their memory is the same
for both methods, and leaving them out isolates the B x T x (U+1) x V tensor.

* batched:    ``rnnt_loss_batched(joiner(enc_out, pred_out), ...)`` (torchaudio on the 4-D tensor)
* samplewise: ``samplewise_rnnt_loss(joiner, enc_out, pred_out, ...)`` (groups up to
  ``max_chunk_bytes``, default 64 MiB)
* pruned / samplewise-pruned: ``memlab.pruned.pruned_rnnt_loss`` (Kuang et al. 2022): the
  "simple" joint of two extra Linear projections (H -> V, :func:`simple_projections`, counted
  with the joiner's parameters) gives each frame a window of ``s_range`` symbols (default 5),
  and the joiner runs on that band only; ``samplewise-pruned`` computes the band one group of
  utterances at a time. Another loss than the full one (equal to it when ``s_range`` >= U+1),
  so these rows report ``loss`` beside the full loss's for comparison.

Sizes. ``seconds`` of audio -> T = 25 encoder frames per second (10 ms fbank frames, 4x
subsampling: 40 ms frames) and U = 5 tokens per second (an assumed subword rate; pass
``tokens_per_second``). Every utterance has the full length (no padding: the least favourable
case for the sample-wise method); ``length_spread=0.5`` draws lengths in [0.5, 1] x the maximum.

Memory. ``peak_bytes``: the peak of live tensor bytes through the step, including what existed
before it (inputs, joiner parameters); ``step_bytes``: the peak minus that baseline. On CPU
they come from ``memlab.memory.MemoryMeter`` (tensor storages through a dispatch mode; buffers
that torchaudio allocates inside its kernel without returning them are not seen); on CUDA from
``torch.cuda.max_memory_allocated``.

Time. Wall-clock and process CPU time of the step, median of ``repeats`` runs that alternate
batched / sample-wise (untimed warm-up first). ``time_ratio`` (wall) and ``cpu_time_ratio`` are
sample-wise over batched; on a shared machine the CPU-time ratio is the steadier figure.

``budget_sweep()`` measures peak and time against the group size (the sample-wise loss's one
knob); ``loss_memory()`` is the analytic calculator of notebook 03 (:func:`estimate_bytes`).

``run_paper()`` is the headline setting of Braun et al. (batch 1024, 40 s audio): on CUDA it runs
the sample-wise step for real (and the batched one only if it would fit); on CPU the meter
measures both on fake tensors (:func:`metered_bytes`, ``memlab.memory.estimate``), marked
``estimated=True``; ``estimated_bytes`` is the analytic model of :func:`estimate_bytes` beside it.
"""

from __future__ import annotations

import statistics
import time
from typing import Dict, List, Optional, Sequence

import torch

from memlab import fast_mode
from memlab.transducer import (DEFAULT_MAX_CHUNK_BYTES, chunk_bytes, plan_chunks,
                               rnnt_loss_batched, samplewise_rnnt_loss)

FRAMES_PER_SECOND = 25.0   # 10 ms fbank frames, 4x subsampling
TOKENS_PER_SECOND = 5.0    # assumed subword rate
METHODS = ("batched", "samplewise")
PRUNED_METHODS = ("pruned", "samplewise-pruned")
ALL_METHODS = METHODS + PRUNED_METHODS
S_RANGE = 5                # symbols per frame the pruned losses keep (icefall's default)


def sizes(seconds: float, frames_per_second: float = FRAMES_PER_SECOND,
          tokens_per_second: float = TOKENS_PER_SECOND):
    """(T, U) of an utterance of ``seconds``."""
    return max(1, round(seconds * frames_per_second)), max(1, round(seconds * tokens_per_second))


def _joiner(enc_dim, pred_dim, joint_dim, vocab_size, device):
    from memlab.models.transducer import Joiner
    joiner = Joiner(enc_dim, pred_dim, joint_dim, vocab_size)
    return joiner if device is None else joiner.to(device)


def make_problem(batch_size: int, T: int, U: int, vocab_size: int, *, hidden: int = 144,
                 joint_dim: int = 144, length_spread: float = 0.0, device="cpu", seed: int = 0):
    """Random enc_out (B, T, H), pred_out (B, U+1, H), targets and lengths, and a Joiner."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    joiner = _joiner(hidden, hidden, joint_dim, vocab_size, device)
    enc = torch.randn(batch_size, T, hidden, generator=g).to(device).requires_grad_()
    pred = torch.randn(batch_size, U + 1, hidden, generator=g).to(device).requires_grad_()
    targets = torch.randint(1, vocab_size, (batch_size, U), generator=g).to(device)
    lo = 1.0 - length_spread
    enc_len = (T * (lo + (1 - lo) * torch.rand(batch_size, generator=g))).ceil().long()
    tgt_len = (U * (lo + (1 - lo) * torch.rand(batch_size, generator=g))).ceil().long()
    enc_len[0], tgt_len[0] = T, U                    # the batch is as long as its longest sample
    return joiner, enc, pred, targets, enc_len.to(device), tgt_len.to(device)


def simple_projections(problem) -> torch.nn.ModuleList:
    """The pruned losses' two "simple" projections (enc H -> V, pred H -> V) for ``problem``
    (:func:`make_problem`'s tuple), seeded, on its device."""
    joiner, enc, pred = problem[:3]
    V = joiner.out.out_features
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        mods = torch.nn.ModuleList([torch.nn.Linear(enc.shape[-1], V),
                                    torch.nn.Linear(pred.shape[-1], V)])
    return mods.to(enc.device)


def loss_step(method: str, joiner, enc, pred, targets, enc_len, tgt_len,
              max_chunk_bytes: Optional[int] = None, stats: Optional[Dict] = None,
              value: bool = True, simple: Optional[torch.nn.ModuleList] = None,
              s_range: int = S_RANGE) -> Optional[float]:
    """One loss + backward; returns the loss value (None with ``value=False``: fake tensors).
    The pruned methods need ``simple`` (:func:`simple_projections`); the others ignore it and
    ``s_range``."""
    if method == "batched":
        loss = rnnt_loss_batched(joiner(enc, pred), targets, enc_len, tgt_len,
                                 kernel="torchaudio")
    elif method == "samplewise":
        loss = samplewise_rnnt_loss(joiner, enc, pred, targets, enc_len, tgt_len,
                                    max_chunk_bytes=max_chunk_bytes, stats=stats)
    elif method in PRUNED_METHODS:
        from memlab.pruned import pruned_rnnt_loss
        if simple is None:
            raise ValueError(f"method {method!r} needs simple=simple_projections(problem)")
        loss = pruned_rnnt_loss(joiner, enc, pred, simple[0], simple[1], targets,  # the projections
                                enc_len, tgt_len, s_range=s_range,
                                samplewise=method == "samplewise-pruned",
                                max_chunk_bytes=max_chunk_bytes)
    else:
        raise ValueError(f"method must be one of {ALL_METHODS}, got {method!r}")
    loss.backward()
    return float(loss.detach()) if value else None


def metered_bytes(method: str, batch_size: int, T: int, U: int, vocab_size: int, *,
                  hidden: int = 144, joint_dim: int = 144,
                  max_chunk_bytes: Optional[int] = None, device="cpu") -> Dict[str, int]:
    """Peak bytes of one loss step measured by the meter on fake tensors (no memory, no data):
    the same step as :func:`measure_peak`, every utterance at full length (T, U); lengths and
    targets are host tensors, so the sample-wise loss plans its groups as it would for real.
    Returns ``{"peak_bytes", "step_bytes"}``; the paper's B=1024 x 40 s takes seconds."""
    from memlab.memory import estimate, host_tensor, real_tensors

    def setup():
        joiner = _joiner(hidden, hidden, joint_dim, vocab_size, None)
        enc = torch.randn(batch_size, T, hidden).requires_grad_()           # (B, T, H)
        pred = torch.randn(batch_size, U + 1, hidden).requires_grad_()      # (B, U+1, H)
        with real_tensors():
            g = torch.Generator().manual_seed(0)
            targets = torch.randint(1, vocab_size, (batch_size, U), generator=g)
        return (joiner, enc, pred, host_tensor(targets), host_tensor([T] * batch_size),
                host_tensor([U] * batch_size))

    def step(*problem):
        loss_step(method, *problem, max_chunk_bytes=max_chunk_bytes, value=False)

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    est = estimate(step, setup, device=device)
    return {"peak_bytes": int(est.peak), "step_bytes": int(est.peak - est.baseline)}


def _clear(joiner, enc, pred, simple=None):
    joiner.zero_grad(set_to_none=True)
    if simple is not None:
        simple.zero_grad(set_to_none=True)
    enc.grad = None
    pred.grad = None


def measure_peak(method: str, problem, max_chunk_bytes: Optional[int] = None,
                 simple: Optional[torch.nn.ModuleList] = None,
                 s_range: int = S_RANGE) -> Dict[str, int]:
    """Peak bytes of one loss step: {"peak_bytes", "step_bytes", "chunks", "loss"}."""
    from memlab.memory import MemoryMeter

    joiner, enc, pred, targets, enc_len, tgt_len = problem
    _clear(joiner, enc, pred, simple)
    pruned = method in PRUNED_METHODS
    model = torch.nn.ModuleList([joiner, simple]) if pruned else joiner
    dev = enc.device
    stats: Dict = {}
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        loss = loss_step(method, *problem, max_chunk_bytes=max_chunk_bytes, stats=stats,
                         simple=simple, s_range=s_range)
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
    else:
        with MemoryMeter(dev, model=model, inputs=[enc, pred, targets, enc_len, tgt_len],
                         timeline=False) as meter:
            loss = loss_step(method, *problem, max_chunk_bytes=max_chunk_bytes, stats=stats,
                             simple=simple, s_range=s_range)
        peak, base = meter.peak, meter.baseline
    _clear(joiner, enc, pred, simple)
    return {"peak_bytes": int(peak), "step_bytes": int(peak - base), "loss": loss,
            "chunks": len(stats.get("chunks", [])) if method == "samplewise" else 1}


def measure_times(problem, repeats: int = 3, max_chunk_bytes: Optional[int] = None,
                  methods: Sequence[str] = METHODS, simple: Optional[torch.nn.ModuleList] = None,
                  s_range: int = S_RANGE):
    """{method: (median wall s, median cpu s)}, runs alternating between the methods."""
    joiner, enc, pred = problem[:3]
    dev = enc.device
    wall: Dict[str, List[float]] = {m: [] for m in methods}
    cpu: Dict[str, List[float]] = {m: [] for m in methods}
    for r in range(repeats + 1):                     # r = 0 is the warm-up
        for m in methods:
            _clear(joiner, enc, pred, simple)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            w0, c0 = time.perf_counter(), time.process_time()
            loss_step(m, *problem, max_chunk_bytes=max_chunk_bytes, simple=simple,
                      s_range=s_range)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            if r:
                wall[m].append(time.perf_counter() - w0)
                cpu[m].append(time.process_time() - c0)
    _clear(joiner, enc, pred, simple)
    return {m: (statistics.median(wall[m]), statistics.median(cpu[m])) for m in methods}


def _time_fields(times, m: str) -> dict:
    if times is None:
        return {"time_s": None, "cpu_s": None, "time_ratio": None, "cpu_time_ratio": None}
    return {"time_s": round(times[m][0], 4), "cpu_s": round(times[m][1], 4),
            "time_ratio": round(times[m][0] / times["batched"][0], 3),
            "cpu_time_ratio": round(times[m][1] / max(times["batched"][1], 1e-9), 3)}


def run(fast: bool = False, batch_sizes: Optional[Sequence[int]] = None,
        seconds: Optional[Sequence[float]] = None, vocab_sizes: Optional[Sequence[int]] = None,
        *, device="cpu", hidden: int = 144, joint_dim: int = 144, repeats: Optional[int] = None,
        max_chunk_bytes: Optional[int] = None, length_spread: float = 0.0,
        frames_per_second: float = FRAMES_PER_SECOND,
        tokens_per_second: float = TOKENS_PER_SECOND, preset: Optional[str] = None,
        methods: Sequence[str] = ALL_METHODS, s_range: int = S_RANGE) -> List[dict]:
    """Batched vs sample-wise (and the pruned losses) over a grid of batch size x audio seconds
    x vocabulary size.

    One row per (configuration, method); ``methods``: any of ``ALL_METHODS`` ("batched" first,
    the rows' ratios are to it); ``s_range``: the pruned losses' band. Defaults: B in (8, 32),
    seconds in (4, 8), V in (128, 512), 3 timed repeats; ``fast`` (or MEMLAB_FAST set): B=4, 2 s, V=32, 1 repeat.
    ``repeats=0`` measures memory only (the time fields are None).
    ``preset="paper"`` returns :func:`run_paper` instead (``memlab bench transducer --preset paper``).
    """
    if preset is not None:
        if preset != "paper":
            raise ValueError(f"preset must be 'paper' or None, got {preset!r}")
        return run_paper(device if torch.device(device).type == "cuda" else None,
                         hidden=hidden, joint_dim=joint_dim, max_chunk_bytes=max_chunk_bytes)
    fast = fast or fast_mode()
    batch_sizes = batch_sizes or ((4,) if fast else (8, 32))
    seconds = seconds or ((2.0,) if fast else (4.0, 8.0))
    vocab_sizes = vocab_sizes or ((32,) if fast else (128, 512))
    repeats = repeats if repeats is not None else (1 if fast else 3)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 0:
        raise ValueError(f"repeats must be an int >= 0, got {repeats!r}")
    if not methods or methods[0] != "batched" or any(m not in ALL_METHODS for m in methods):
        raise ValueError(f"methods must start with 'batched' and be drawn from {ALL_METHODS}, "
                         f"got {methods!r}")
    device = torch.device(device)
    rows: List[dict] = []
    for B in batch_sizes:
        for s in seconds:
            T, U = sizes(s, frames_per_second, tokens_per_second)
            for V in vocab_sizes:
                problem = make_problem(B, T, U, V, hidden=hidden, joint_dim=joint_dim,
                                       length_spread=length_spread, device=device)
                simple = (simple_projections(problem)
                          if any(m in PRUNED_METHODS for m in methods) else None)
                mem = {m: measure_peak(m, problem, max_chunk_bytes, simple, s_range)
                       for m in methods}
                times = (measure_times(problem, repeats, max_chunk_bytes, methods, simple,
                                       s_range) if repeats else None)
                for m in methods:
                    rows.append({
                        "method": m, "device": str(device), "batch_size": B, "seconds": s,
                        "T": T, "U": U, "vocab_size": V, "joint_dim": joint_dim,
                        "peak_bytes": mem[m]["peak_bytes"], "step_bytes": mem[m]["step_bytes"],
                        "peak_mib": round(mem[m]["peak_bytes"] / 2**20, 2),
                        "peak_ratio": round(mem[m]["peak_bytes"] / mem["batched"]["peak_bytes"], 4),
                        **_time_fields(times, m),
                        "chunks": mem[m]["chunks"],
                        "max_chunk_bytes": (max_chunk_bytes or DEFAULT_MAX_CHUNK_BYTES)
                        if m in ("samplewise", "samplewise-pruned") else None,
                        "s_range": s_range if m in PRUNED_METHODS else None,
                        "loss": round(mem[m]["loss"], 4), "estimated": False,
                    })
                del problem
    return rows


def budget_sweep(batch_size: int = 32, seconds: float = 4.0, vocab_size: int = 512,
                 group_sizes: Sequence[int] = (1, 2, 4, 8, 16), *, repeats: int = 2,
                 device="cpu", hidden: int = 144, joint_dim: int = 144,
                 length_spread: float = 0.0, frames_per_second: float = FRAMES_PER_SECOND,
                 tokens_per_second: float = TOKENS_PER_SECOND) -> List[dict]:
    """The sample-wise loss's one knob: peak memory and time against the group size.

    For each n in ``group_sizes`` the budget is ``chunk_bytes(n, T, U, V)``, so every call of the
    joiner and the loss takes n full-length samples. One row per group size (``method``
    "samplewise") and a first row for the batched loss (``group_size`` = the batch). Timings are
    side by side with the batched loss for every n (``time_ratio``, ``cpu_time_ratio``);
    ``repeats=0`` measures memory only.
    """
    T, U = sizes(seconds, frames_per_second, tokens_per_second)
    for n in group_sizes:
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= batch_size:
            raise ValueError(f"group_sizes must be ints in [1, batch_size={batch_size}], got {n!r}")
    problem = make_problem(batch_size, T, U, vocab_size, hidden=hidden, joint_dim=joint_dim,
                           length_spread=length_spread, device=torch.device(device))
    base = {"device": str(torch.device(device)), "batch_size": batch_size, "seconds": seconds,
            "T": T, "U": U, "vocab_size": vocab_size}
    bat = measure_peak("batched", problem)
    rows = [dict(base, method="batched", group_size=batch_size, max_chunk_bytes=None,
                 chunks=1, peak_bytes=bat["peak_bytes"], step_bytes=bat["step_bytes"],
                 peak_mib=round(bat["peak_bytes"] / 2**20, 2), peak_ratio=1.0,
                 time_ratio=1.0 if repeats else None, cpu_time_ratio=1.0 if repeats else None)]
    for n in group_sizes:
        budget = chunk_bytes(n, T, U, vocab_size)
        sw = measure_peak("samplewise", problem, budget)
        times = measure_times(problem, repeats, budget) if repeats else None
        f = _time_fields(times, "samplewise")
        rows.append(dict(base, method="samplewise", group_size=n, max_chunk_bytes=budget,
                         chunks=sw["chunks"], peak_bytes=sw["peak_bytes"],
                         step_bytes=sw["step_bytes"], peak_mib=round(sw["peak_bytes"] / 2**20, 2),
                         peak_ratio=round(sw["peak_bytes"] / bat["peak_bytes"], 4),
                         time_ratio=f["time_ratio"], cpu_time_ratio=f["cpu_time_ratio"]))
    del problem
    return rows


def estimate_bytes(method: str, batch_size: int, T: int, U: int, vocab_size: int, *,
                   hidden: int = 144, joint_dim: int = 144, max_chunk_bytes: Optional[int] = None,
                   bytes_per_element: int = 4) -> int:
    """Analytic peak bytes of one loss step with every utterance at full length (T, U).

    Both methods hold the inputs (enc_out, pred_out), their gradients and the joiner parameters.
    batched adds the logits and torchaudio's gradient of them (2 x B T (U+1) V) and the joiner's
    tanh output kept for backward (B T (U+1) J). samplewise adds the same for its largest group
    (:func:`memlab.transducer.plan_chunks`) instead of the whole batch.
    """
    e = bytes_per_element
    common = 2 * (batch_size * T * hidden + batch_size * (U + 1) * hidden) * e   # inputs + grads
    common += (2 * hidden * joint_dim + joint_dim * vocab_size + 3 * joint_dim + vocab_size) * e
    if method == "batched":
        n = batch_size
    elif method == "samplewise":
        n = max(len(c) for c in plan_chunks([T] * batch_size, [U] * batch_size, vocab_size,
                                            max_chunk_bytes, e))
    else:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return common + chunk_bytes(n, T, U, vocab_size, e) + n * T * (U + 1) * joint_dim * e


def loss_memory(batch_size: int, seconds: float, vocab_size: int, *, hidden: int = 144,
                joint_dim: int = 144, max_chunk_bytes: Optional[int] = None,
                frames_per_second: float = FRAMES_PER_SECOND,
                tokens_per_second: float = TOKENS_PER_SECOND, bytes_per_element: int = 4) -> dict:
    """What the transducer loss step needs for a batch of ``seconds``-long utterances (fp32).

    The calculator of notebook 03: the sizes of the batch's 4-D tensors and the analytic peaks
    of :func:`estimate_bytes` for both methods. Keys: ``T``, ``U``, ``logits_bytes`` (the
    B x T x (U+1) x V logits), ``gradient_bytes`` (their gradient, the same size),
    ``joiner_hidden_bytes`` (the B x T x (U+1) x joint_dim tanh output), ``group_size`` (samples
    per sample-wise call), ``group_bytes`` (logits + gradient of one sample-wise call),
    ``batched_bytes`` / ``samplewise_bytes`` (whole loss step) and ``ratio`` (batched over
    sample-wise).
    """
    for name, v in (("batch_size", batch_size), ("vocab_size", vocab_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds <= 0:
        raise ValueError(f"seconds must be a positive number, got {seconds!r}")
    T, U = sizes(seconds, frames_per_second, tokens_per_second)
    e = bytes_per_element
    cells = batch_size * T * (U + 1)
    group = max(len(c) for c in plan_chunks([T] * batch_size, [U] * batch_size, vocab_size,
                                            max_chunk_bytes, e))
    kw = dict(hidden=hidden, joint_dim=joint_dim, max_chunk_bytes=max_chunk_bytes,
              bytes_per_element=e)
    out = {"batch_size": batch_size, "seconds": seconds, "vocab_size": vocab_size, "T": T, "U": U,
           "logits_bytes": cells * vocab_size * e, "gradient_bytes": cells * vocab_size * e,
           "joiner_hidden_bytes": cells * joint_dim * e, "group_size": group,
           "group_bytes": chunk_bytes(group, T, U, vocab_size, e),
           "batched_bytes": estimate_bytes("batched", batch_size, T, U, vocab_size, **kw),
           "samplewise_bytes": estimate_bytes("samplewise", batch_size, T, U, vocab_size, **kw)}
    out["ratio"] = out["batched_bytes"] / out["samplewise_bytes"]
    return out


def run_paper(device=None, *, batch_size: int = 1024, seconds: float = 40.0,
              vocab_size: int = 1024, hidden: int = 144, joint_dim: int = 144,
              max_chunk_bytes: Optional[int] = None, frames_per_second: float = FRAMES_PER_SECOND,
              tokens_per_second: float = TOKENS_PER_SECOND) -> List[dict]:
    """The paper's headline setting (batch 1024 x 40 s of audio; V and the token rate assumed).

    CUDA (default when available): the sample-wise step runs for real (peak from
    ``torch.cuda.max_memory_allocated``); the batched step runs only if its estimate fits in the
    free GPU memory, otherwise its row is measured on fake tensors. CPU: both rows are measured
    by the meter on fake tensors (``estimated=True``).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    T, U = sizes(seconds, frames_per_second, tokens_per_second)
    est = {m: estimate_bytes(m, batch_size, T, U, vocab_size, hidden=hidden, joint_dim=joint_dim,
                             max_chunk_bytes=max_chunk_bytes) for m in METHODS}
    rows = []
    problem = None
    if device.type == "cuda":
        problem = make_problem(batch_size, T, U, vocab_size, hidden=hidden, joint_dim=joint_dim,
                               device=device)
        free = torch.cuda.mem_get_info(device)[0]
    for m in METHODS:
        row = {"method": m, "device": str(device), "batch_size": batch_size, "seconds": seconds,
               "T": T, "U": U, "vocab_size": vocab_size, "joint_dim": joint_dim,
               "estimated_bytes": est[m], "estimated_gib": round(est[m] / 2**30, 2)}
        if problem is not None and (m == "samplewise" or est[m] < 0.9 * free):
            mem = measure_peak(m, problem, max_chunk_bytes)
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            loss_step(m, *problem, max_chunk_bytes=max_chunk_bytes)
            torch.cuda.synchronize(device)
            _clear(*problem[:3])
            row.update(peak_bytes=mem["peak_bytes"], peak_gib=round(mem["peak_bytes"] / 2**30, 2),
                       time_s=round(time.perf_counter() - t0, 3), chunks=mem["chunks"],
                       estimated=False)
        else:
            metered = metered_bytes(m, batch_size, T, U, vocab_size, hidden=hidden,
                                    joint_dim=joint_dim, max_chunk_bytes=max_chunk_bytes,
                                    device=device)["peak_bytes"]
            row.update(peak_bytes=metered, peak_gib=round(metered / 2**30, 2), time_s=None,
                       chunks=None, estimated=True, source="meter on fake tensors")
        rows.append(row)
    return rows


if __name__ == "__main__":  # pragma: no cover
    for r in run():
        print(r)
    for r in run_paper():
        print(r)
