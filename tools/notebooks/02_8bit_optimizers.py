# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
#   language_info:
#     name: python
# ---

# %% [markdown]
# # 02 · 8-bit optimizers: the same training with a quarter of the optimizer state
#
# An optimizer keeps *state* beside every parameter: SGD with momentum one buffer (4 bytes per
# parameter in fp32), Adam two moments (8 bytes). For a speaker-embedding ResNet that is as much
# memory as the parameters and gradients together, and more than twice as much for Adam.
# Dettmers et al. (*8-bit Optimizers via Block-wise Quantization*, ICLR 2022, arXiv 2110.02861)
# store that state in 8 bits; Liu & Qian (arXiv 2412.01195) use these optimizers to train
# speaker-verification networks with the same EER. Two ideas make it work:
#
# 1. **The dynamic tree data type**: 256 values spread over seven orders of magnitude (not
#    evenly spaced like int8), because optimizer states span many orders of magnitude.
# 2. **Block-wise quantization**: each block of 256 consecutive values is scaled by its own
#    absolute maximum, so one outlier only costs precision in its own block.
#
# Each step dequantizes a piece of the state to fp32, does the ordinary fp32 update and
# requantizes. `memlab.quant` holds the data types and the (de)quantization, `memlab.optim`
# the optimizers `SGD8bit`, `Adam8bit` and `AdamW8bit`. This notebook looks at (1) the code
# values, (2) the rounding errors, (3) the memory, (4) the speed, and (5) trains a speaker model
# live with Adam and Adam8bit.

# %% [markdown]
# The next cell holds every size this notebook uses (tagged `parameters`). `FAST` picks tiny
# sizes for tests and CI: read the figures from a full run.

# %% tags=["parameters"]
from memlab import fast_mode

FAST = fast_mode()                      # MEMLAB_FAST=1: tiny sizes (tests, CI)
STATE_NUMEL = 2 ** 16 if FAST else 2 ** 20   # elements of the simulated Adam states (section 2)
TIME_REPEATS = 3 if FAST else 15             # timed optimizer steps per optimizer (section 4)
TIME_THREADS = 1                             # torch threads for the timings (steadier ratios)
LAB_WIDTH = 16 if FAST else 32               # base channels of the dashboard's ResNet
LAB_BATCH = 4 if FAST else 16
LAB_STEPS = 6 if FAST else 150

# %%
import math

import plotly.graph_objects as go
import torch

from memlab.bench import optim as study
from memlab.quant import dynamic_map, linear_map, quantize_blockwise, dequantize_blockwise
from memlab.report import format_table, run_summary
from memlab.widgets import MemoryLab

torch.manual_seed(0)

# %% [markdown]
# ## 1. The 256 values of each data type
#
# `dynamic_map(signed)` returns the 256 values of the dynamic tree type, sorted, in [-1, 1];
# `linear_map(signed)` the evenly spaced int8 (`k / 127`) or uint8 (`k / 255`) grid. A value
# is stored as the index (0..255) of its nearest map value after dividing by the block's
# absmax. The unsigned variants are for Adam's second moment, which is never negative: the
# sign bit buys one more bit of precision.
#
# The plot shows every positive value of each map as a tick on a logarithmic axis. **Look
# for:** the linear maps stop at 1/127 ≈ 0.008 (1/255 for uint8): anything smaller than 1 % of
# its block's maximum rounds to 0 or to that first step. The dynamic maps reach down to about
# 10⁻⁶ (seven decades, one per position of the marker bit), denser near 1 (64 values between
# 0.1 and 1 in the signed map) and sparser near 10⁻⁶.

# %%
maps = {"dynamic signed": dynamic_map(True), "dynamic unsigned": dynamic_map(False),
        "linear signed (int8)": linear_map(True), "linear unsigned (uint8)": linear_map(False)}
fig = go.Figure()
for name, code in maps.items():
    pos = code[code > 0]
    fig.add_scatter(x=pos.tolist(), y=[name] * pos.numel(), mode="markers", name=name,
                    marker=dict(symbol="line-ns-open", size=14, line=dict(width=1)),
                    hovertemplate="%{x:.3g}<extra>" + name + "</extra>")
    print(f"{name:24s} {int((code > 0).sum()):3d} positive values, smallest "
          f"{pos.min().item():.3g}, largest {pos.max().item():.5f}, "
          f"{int((code < 0).sum()):3d} negative, zero included: {bool((code == 0).any())}")
fig.update_layout(template="plotly_white", height=330, showlegend=False,
                  title=dict(text="<b>Positive values of the 8-bit maps</b> · one tick per code "
                             "value", x=0.01),
                  xaxis=dict(title="code value (fraction of the block's absmax, log scale)",
                             type="log", range=[-7.5, 0.1], exponentformat="power"),
                  yaxis=dict(title="data type"))
fig

# %% [markdown]
# The same values as the spacing between neighbours, relative to the value: the relative
# precision. **Look for:** the dynamic map's relative step is ~1.5 % near 1 and grows slowly
# decade by decade (fewer fraction bits each time the marker bit moves right), while the linear
# map's relative step grows as 1 / value: 50 % at 2/127, and nothing at all below 1/127.

# %%
fig = go.Figure()
for name, code in maps.items():
    pos = code[code > 0]
    fig.add_scatter(x=pos[1:].tolist(), y=((pos[1:] - pos[:-1]) / pos[1:]).tolist(),
                    mode="lines+markers", marker=dict(size=4), name=name)
fig.update_layout(template="plotly_white", height=380,
                  title=dict(text="<b>Relative precision of the 8-bit maps</b> · gap to the "
                             "next smaller code value", x=0.01),
                  xaxis=dict(title="code value (fraction of absmax, log scale)", type="log",
                             exponentformat="power"),
                  yaxis=dict(title="(value − next smaller) / value (log scale)", type="log",
                             exponentformat="power"))
fig

# %% [markdown]
# ## 2. Rounding errors on Adam-like states: data type × blocking
#
# `study.adam_like_states` runs 30 steps of Adam's moment updates on synthetic gradients whose
# per-element scale is log-normal (orders of magnitude apart, as across the weights of a real
# network). We quantize the first moment with each map, either per tensor (one absmax for the
# whole tensor) or block-wise (one absmax per 256 elements), dequantize, and histogram the
# relative error |x̂ − x| / |x| of every element. **Look for:** linear per-tensor has a large
# mass at 100 % error (small values rounded to zero); block-wise helps the linear map a lot;
# the dynamic map is good either way, and dynamic block-wise is the best: most elements within
# a few per cent.

# %%
m, v = study.adam_like_states(STATE_NUMEL)
combos = [("linear", "per-tensor"), ("linear", "block-wise"), ("dynamic", "per-tensor"),
          ("dynamic", "block-wise")]
edges = torch.linspace(-6, 1, 71)                                   # log10 of the relative error
centers = 10 ** ((edges[1:] + edges[:-1]) / 2)
fig = go.Figure()
rows, spikes = [], []
for mname, blocking in combos:
    code = dynamic_map(True) if mname == "dynamic" else linear_map(True)
    bs = 256 if blocking == "block-wise" else m.numel()
    err = study.relative_errors(m, code, bs)
    counts = torch.histogram(err.clamp(1e-6, 9.99).log10(), bins=edges).hist
    share = (100 * counts / err.numel()).tolist()                   # % of the elements per bin
    fig.add_scatter(x=centers.tolist(), y=[p if p > 0 else None for p in share],  # log y: no 0
                    mode="lines", line_shape="hvh", name=f"{mname}, {blocking}")
    zeroed = 100 * (err == 1).float().mean().item()       # x̂ = 0: relative error exactly 1
    if zeroed >= 1:
        spikes.append((zeroed, f"{mname}, {blocking}"))
    abs_err, rel_err = study.quant_error(m, code, bs)
    rows.append({"map": mname, "blocking": blocking, "mean|err|/mean|x|": round(abs_err, 5),
                 "mean relative error": round(rel_err, 4),
                 "share with error >= 50%": round((err >= 0.5).float().mean().item(), 4)})
fig.update_layout(template="plotly_white", height=400,
                  title=dict(text="<b>Relative quantization error of Adam's first moment</b> · "
                             "per element", x=0.01),
                  xaxis=dict(title="relative error |x̂ − x| / |x| (log scale)", type="log",
                             exponentformat="power"),
                  yaxis=dict(title="elements (%, log scale)", type="log",
                             exponentformat="power"),
                  legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0),
                  margin=dict(t=90))
if spikes:   # the spike at error 1 is values rounded to zero: say so where it is
    zeroed, who = max(spikes)
    fig.add_annotation(x=0, y=math.log10(zeroed), xref="x", yref="y",   # log axes: log10 units
                       text=f"{who}: {zeroed:.0f} % rounded to 0", showarrow=True, ax=-90,
                       ay=10, font=dict(size=11), bgcolor="rgba(255,255,255,0.8)")
fig

# %%
print(format_table(rows))

# %% [markdown]
# The second moment is non-negative, so it uses the unsigned maps. **Look for:** the same
# ranking; the errors of the second moment matter less than they look, because the update
# divides by its square root (halving the relative error).

# %%
print(format_table([{"state": r["subject"], "mean|err|/mean|x|": r["value"],
                     "reference": r["reference"], "ratio to reference": r["ratio"],
                     "mean relative error": r["rel_error"]}
                    for r in study.error_rows(STATE_NUMEL) if "exp_avg_sq" in r["subject"]]))

# %% [markdown]
# A round trip by hand, to see the two stored tensors: 8-bit codes (one byte per element) and
# one float32 absmax per block.

# %%
x = torch.randn(1000) * torch.logspace(-4, 0, 1000)                 # (1000,) magnitudes 1e-4..1
codes, absmax = quantize_blockwise(x, dynamic_map(True), block_size=256)
x_hat = dequantize_blockwise(codes, absmax, dynamic_map(True), block_size=256)
print(f"codes {codes.dtype} {tuple(codes.shape)}, absmax {absmax.dtype} {tuple(absmax.shape)}: "
      f"{codes.numel() + 4 * absmax.numel()} bytes instead of {4 * x.numel()}")
print(f"max relative error {((x_hat - x).abs() / x.abs()).max().item():.3f}, "
      f"mean {((x_hat - x).abs() / x.abs()).mean().item():.4f}")

# %% [markdown]
# ### When a block's second moments span too much: never store a non-zero as 0
#
# Adam divides by √v. Within one block of 256 the second moments can span more decades than
# the unsigned map (its smallest non-zero value is 0.325·10⁻⁶ of the block's absmax): with
# heavy-tailed gradients (each element's gradient scale log-normal with spread σ) plain
# nearest rounding stores the smallest ones as **0**, and those elements then step by m / ε,
# thousands of times further than Adam would. `memlab` gives a positive second moment whose
# nearest code is 0 the smallest non-zero code instead, on every path (eager, fused C, CUDA):
# the stored v is then slightly too large, so that element steps a little *less* than Adam.
#
# `study.drift_to_fp32` feeds the same gradient stream to an 8-bit Adam and to fp32
# `torch.optim.Adam` and reports the distance ‖p − p_fp32‖ / ‖p_fp32 − p₀‖ (in units of the
# whole fp32 update). **Look for:** the share that nearest rounding would zero grows with σ
# (table); memlab's distance stays a small fraction of the update at every σ, and (when
# bitsandbytes is installed) at or below bitsandbytes' 8-bit Adam.

# %%
drift_sigmas = (0.5, 1.0, 1.5, 2.0, 2.5)
drift_numel, drift_steps = (2 ** 14, 10) if FAST else (2 ** 20, 50)
print(format_table([{"sigma": s, "nearest rounding: second moments stored as 0":
                     f"{100 * study.nearest_zero_fraction(s, drift_numel, drift_steps):.2f} %"}
                    for s in drift_sigmas]))
drift = study.drift_rows(sigmas=drift_sigmas, n=drift_numel, steps=drift_steps,
                         names=[n for n in study.drift_makers() if n != "adam8bit-eager"])
fig = go.Figure()
for name in dict.fromkeys(r["subject"] for r in drift):
    rs = [r for r in drift if r["subject"] == name]
    fig.add_scatter(x=[r["sigma"] for r in rs], y=[r["value"] for r in rs],
                    mode="lines+markers", name="memlab Adam8bit" if name == "adam8bit" else name)
fig.update_layout(template="plotly_white", height=380,
                  title=dict(text=f"<b>Distance to fp32 Adam</b> · after {drift_steps} steps, "
                             f"{drift_numel:,} elements", x=0.01),
                  xaxis=dict(title="spread of per-element gradient scales σ (log-normal)"),
                  yaxis=dict(title="‖p − p_fp32‖ / ‖p_fp32 − p₀‖", rangemode="tozero"))
fig

# %% [markdown]
# ## 3. How much memory the state takes
#
# `study.state_memory` creates the state of each optimizer on the parameters of a ResNet-like
# network (3×3 convs in four stages, a projection, small BatchNorm vectors) with one `step()`
# inside a `MemoryMeter`. `state_bytes` is what the meter counts in the **optimizer** category
# after the step, `state_nbytes` the storages in `optimizer.state` counted directly (the two
# must agree). **Look for:** 4 → ~1 byte per parameter for SGD, 8 → ~2 for Adam (the ~0.03
# above 1 and 2 is the absmax per block of 256 plus the small tensors that keep fp32 state:
# `min_8bit_size=4096`), i.e. about 75 % less. `step_peak_bytes` is the optimizer category's
# maximum *during* the step: the 8-bit optimizers dequantize one piece at a time, so their fp32
# working copies add a bounded amount, not 4 bytes per parameter.

# %%
mem = study.state_memory(FAST)
print(format_table(mem))

# %%
fig = go.Figure()
for eight_bit, name, color in ((False, "fp32 state (torch.optim)", "#9e9e9e"),
                               (True, "8-bit state (memlab)", "#2e7d32")):
    rs = [r for r in mem if ("8bit" in r["optimizer"]) == eight_bit]
    fig.add_bar(x=[r["optimizer"] for r in rs], y=[r["bytes_per_param"] for r in rs],
                text=[f"{r['bytes_per_param']:.2f}" for r in rs], textposition="outside",
                marker_color=color, name=name)
fig.update_layout(template="plotly_white", height=380, barmode="overlay",
                  title=dict(text="<b>Optimizer state per parameter</b> · "
                             f"{mem[0]['params']:,} parameters, measured with MemoryMeter",
                             x=0.01),
                  xaxis=dict(title="optimizer", type="category",
                             categoryorder="array", categoryarray=[r["optimizer"] for r in mem]),
                  yaxis=dict(title="optimizer state (bytes / parameter)", rangemode="tozero"),
                  legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0),
                  margin=dict(t=90))
fig

# %% [markdown]
# ## 4. What it costs in time
#
# Each step of an 8-bit optimizer does more work than torch's fp32 one: look up the code values,
# update, find each block's absmax, round to the nearest code. Done as separate torch ops (the
# `-eager` rows, `compile=False`) that is 15-30 passes over memory where torch's `foreach`
# optimizer makes 3-7, so it is several times slower. By default memlab runs the step on CPU as
# one small C kernel (compiled with the system C compiler on first use, `path` = `fused-c`) that
# touches each byte once per block of 256, and on CUDA through `torch.compile`.
# `study.step_times` times `optimizer.step()` of each against torch's `foreach` fp32 optimizer
# on the same parameters, alternately in one process (`TIME_THREADS` torch threads).
# **Look for:** the `ratio` column (8-bit time / fp32 time), which is what to compare across
# machines -- the fused rows should sit within about 2x, the eager ones far above; absolute
# milliseconds depend on the CPU and on what else runs on it.

# %%
timing = study.step_times(fast=FAST, repeats=TIME_REPEATS, threads=TIME_THREADS)
print(format_table(timing, ["subject", "path", "value", "reference", "reference_value",
                            "ratio", "threads", "numel", "device"]))

# %% [markdown]
# ## 5. Live: train a speaker model with Adam and with Adam8bit
#
# The dashboard trains a ResNet speaker-embedding model on synthetic speakers; the
# **optimizer** dropdown lists every registered optimizer, 8-bit ones included. The next cell
# shows it; the one after presses **Run** from code twice (same seed, same data, same model)
# and waits for each run.

# %%
lab = MemoryLab(task="speaker", width=LAB_WIDTH, batch_size=LAB_BATCH, steps=LAB_STEPS)
lab.show()

# %% [markdown]
# **Look for:** in *Memory at the peak*, the green optimizer segment of the `adam8bit` bar is
# about a quarter of `adam`'s, while the other segments are unchanged; the loss curves of the
# two runs lie nearly on top of each other; the table's EER and accuracy agree within noise
# (in a full run: small differences from one seed are noise). The step-time column shows the
# price of quantizing.

# %%
runs = {}
for name in ("adam", "adam8bit"):
    runs[name] = lab.run(block=True, optimizer=name)
for name, records in runs.items():
    print(run_summary(name, records, "optimizer"))

# %% [markdown]
# ## Exercises
#
# 1. **Block size.** Repeat section 2 with blocks of 64, 1024 and 4096 (`study.quant_error(m,
#    dynamic_map(True), bs)`). How does the error grow with the block? What does a smaller
#    block cost in memory (bytes per parameter as a function of the block size)?
# 2. **Linear states in the optimizer.** `Adam8bit` always uses the dynamic map. Quantize the
#    second moment `v` with `linear_map(False)` per block and count how many elements become
#    exactly 0. What would Adam's update `m / (sqrt(v) + eps)` do to those elements?
# 3. **SGD too.** Run the dashboard with `sgd` and `sgd8bit` (`lab.run(block=True,
#    optimizer="sgd8bit")`). Is the saving in bytes the same as for Adam? As a fraction of the
#    total peak?
# 4. **When is it worth it?** Use `lab.set(batch_size=...)` (or `memlab.ui.measure.sweep`) to find
#    the batch size at which the optimizer state is less than 10 % of the peak with Adam. What
#    dominates then, and which notebook's technique addresses it?
# 5. **Within noise?** Run `memlab compare --task speaker --optimizer adam,adam8bit` with two
#    or three seeds (`--seed`). Is the EER difference between Adam and Adam8bit larger than the
#    difference between two seeds of Adam?
# 6. **Small tensors.** `min_8bit_size=4096` keeps fp32 state for BatchNorm vectors and biases.
#    Set it to 0 in `study._builders` style (`Adam8bit(params, min_8bit_size=0)`) and compare
#    the bytes per parameter: why is the gain so small?
