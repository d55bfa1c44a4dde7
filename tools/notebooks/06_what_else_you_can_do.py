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
# # 06 · What else you can do: the standard alternatives beside the seed techniques
#
# Notebooks 01-05 follow four published techniques: reversible blocks, 8-bit optimizer states,
# the sample-wise transducer loss and low-rank gradients. They are not the only ways to save
# memory. PyTorch users reach first for **checkpointing**, **mixed precision** (bf16 autocast;
# fp16 with a gradient scaler on CUDA), **gradient accumulation** (K micro-batches, one optimizer
# step), the **optimizer step in backward** (each parameter stepped and its gradient freed as
# soon as it is complete), **4-bit optimizer states** (Li et al. 2023), **activation offload**
# to host memory (CUDA only) and the **pruned RNN-T loss** (Kuang et al. 2022). memlab registers
# each of them as a technique, so they run in every scenario, in `memlab compare
# --precision/--accumulation/--optimizer-step/--optimizer/--loss` and in the planner.
#
# This notebook puts them side by side with the seed techniques and asks, for each, three
# questions: **what does it save** (peak and breakdown, live on this CPU and at the full-size
# twin), **what does it cost** (step time, measured live beside the baseline) and **when does it
# change the result**. Then it combines them. All rows come from one function,
# `memlab.alternatives.compare(scenario, choices)`. **How to run:** *Run ▸ Run All Cells*; with
# `MEMLAB_FAST=1` tiny sizes finish in seconds (read the figures from a full run: a few minutes
# on a laptop CPU; every run takes only a few steps, not a training).

# %% [markdown]
# The next cell holds every size and choice this notebook uses (tagged `parameters`). A choice
# is `"kind=name"`, several joined by `+`; each is the scenario's baseline with those kinds
# changed.

# %% tags=["parameters"]
from memlab import fast_mode

FAST = fast_mode()                      # MEMLAB_FAST=1: tiny sizes (tests, CI)
REPEATS = 2 if FAST else 5              # timed steps per choice, round-robin (after 2 metered)
ACTIVATION_CHOICES = ["memory=checkpoint", "memory=reversible", "memory=reversible-full",
                      "precision=bf16", "accumulation=accumulate2", "accumulation=accumulate4"]
OPTIMIZER_CHOICES = ["optimizer=adam8bit", "optimizer=adam4bit", "optimizer=lowrank-adam",
                     "optimizer-step=in-backward",
                     "optimizer-step=in-backward+optimizer=adam8bit"]
LOSS_CHOICES = ["loss=samplewise", "loss=pruned", "loss=samplewise-pruned", "precision=bf16"]
REFUSED = ["optimizer-step=in-backward+optimizer=lowrank-adam",
           "optimizer-step=in-backward+accumulation=accumulate2"]
COMBINATIONS = ["memory=checkpoint+precision=bf16",
                "memory=reversible-full+optimizer=adam8bit",
                "memory=reversible-full+optimizer=adam8bit+precision=bf16",
                "memory=reversible-full+optimizer=adam8bit+precision=bf16"
                "+optimizer-step=in-backward"]
S_RANGES = [2, 3, 4, 5, 6, 7, 9]        # pruned band widths of section 4 (U = 6 tokens)
FIT = "12MiB" if FAST else "11GiB"      # section 6: the card (fast: the tiny stand-in's scale)
PLAN_KINDS = ("memory", "precision") if FAST else None   # None: every kind the planner knows
PLAN_SECONDS = 10 if FAST else 60       # bound on the planner's search

# %%
import torch
import plotly.graph_objects as go

from memlab import alternatives, planner, scenarios, techniques
from memlab.lab import Config
from memlab.memory import CATEGORIES, format_bytes
from memlab.plots import tradeoff_figure
from memlab.report import format_table
from memlab.ui.figures import breakdown_figure

torch.manual_seed(0)
torch.set_num_threads(1)                # steadier step-time ratios on a shared CPU

# %% [markdown]
# ## 0. What is registered
#
# Every kind and its techniques, straight from the registry (`memlab.techniques`), for the
# speaker task and the ASR task. **Look for:** each kind's first name is its no-op default
# (`fp32`, `none`, `after-backward`); `fp16` and `offload=host` appear only where CUDA does
# (on this CPU they are missing from the list).

# %%
for kind in techniques.kinds():
    names = sorted(set(techniques.names(kind, "speaker")) | set(techniques.names(kind, "asr")),
                   key=lambda n: n != techniques.default(kind))
    print(f"{kind:15s} {', '.join(names)}")
print("\nCUDA here:", torch.cuda.is_available())

# %% [markdown]
# ## 1. Activations: the deep speaker net
#
# Scenario `deep-speaker`: a DF-ResNet whose third stage has 24 inverted-bottleneck blocks
# (6 in fast mode), where activations are almost the whole peak. Four ways to shrink them:
# recompute them (checkpointing), do without them (reversible blocks), store them in half the
# bytes (bf16 autocast) or make the batch that produces them smaller (accumulation: K
# micro-batches of B/K, the gradients summed, one optimizer step). Each row is two metered
# steps and a few timed ones on one random batch. **Look for:** in the *saving* column,
# accumulate4 near 4× of the activations, bf16 near 2× (autocast also keeps a bf16 copy of each
# weight: a little more than half); checkpointing and reversible blocks in between and beyond;
# the *step time* column: what each costs against the baseline. The row *baseline, another
# batch* is the baseline again (section 5 says why): its step time is the noise of these
# ratios on a shared CPU.

# %%
deep = alternatives.compare("deep-speaker", ACTIVATION_CHOICES, repeats=REPEATS)
print(alternatives.format_rows(deep))

# %% [markdown]
# The same peaks as stacked bars, one colour per category, in MiB. **Look for:** only the
# orange *activations* block moves; parameters, gradients and Adam state stay as they are.

# %%
def bars(rows, full=False):
    """Rows of alternatives.compare -> rows of breakdown_figure (live or at full size)."""
    out = []
    for r in rows:
        if "refused" in r or r["run"] == "baseline, another batch":
            continue
        if full and r.get("full_breakdown") is None:
            continue
        bd = r["full_breakdown"] if full else r
        out.append({"label": r["run"].replace(" + ", "<br>+ ").replace("=", "=<br>"),
                    **{c: bd.get(c, 0) for c in CATEGORIES}})
    return out


s = scenarios.get("deep-speaker")
breakdown_figure(bars(deep), title="Live, deep-speaker: memory at the peak of a training step",
                 unit="MiB", xaxis_title="choice (kind=name)", height=420)

# %% [markdown]
# ### At full size: DF-ResNet233, batch 128 × 200 frames
#
# The scenario's full-size twin, estimated on fake tensors (`scenarios.full_size`, the same
# training step as the live one). **Look for:** the ratios hold at full size; the 11 GB of an
# RTX 2080 Ti (dashed line) is within reach of several single choices. (In fast mode the twin
# is a tiny stand-in: the shapes of the bars mean something, the sizes do not.)

# %%
full_title = scenarios.full_size("deep-speaker", {})["label"]
breakdown_figure(bars(deep, full=True), title=f"Full size ({full_title}), on fake tensors",
                 unit="GiB", xaxis_title="choice (kind=name)", height=420,
                 limit=11 * 10**9 / 2**30, limit_label="RTX 2080 Ti (11 GB)")

# %% [markdown]
# ## 2. Optimizer state and gradients: a wide net at batch 4
#
# Scenario `optimizer-bound` (a wide ResNet fine-tuned at batch 4): parameters, gradients and
# Adam's two moments are most of the step. 8-bit states keep ~2 B per parameter for Adam, 4-bit
# ~1.05 B (fp32: 8); LowRankAdam keeps the gradients and moments of rank-r factors only; the
# optimizer step in backward never holds every gradient at once (each is used and freed as soon
# as backward completes it). **Look for:** the *optimizer* column falling from adam to adam8bit
# to adam4bit; the *gradients* column of `in-backward` (only the gradients in flight are left
# at the peak); in-backward + adam8bit, two savings on different tensors that add up.

# %%
wide = alternatives.compare("optimizer-bound", OPTIMIZER_CHOICES, repeats=REPEATS)
print(alternatives.format_rows(wide))

# %%
breakdown_figure(bars(wide), title="Live, optimizer-bound: memory at the peak of a training "
                 "step", unit="MiB", xaxis_title="choice (kind=name)", height=420)

# %% [markdown]
# At full size (ResNet34 at width 64, batch 4 × 200 frames, 5,994 speakers), in GiB. **Look
# for:** the same order; at full size the 5,994-speaker head makes the parameter-sized
# categories weigh even more.

# %%
full_title = scenarios.full_size("optimizer-bound", {})["label"]
breakdown_figure(bars(wide, full=True), title=f"Full size ({full_title}), on fake tensors",
                 unit="GiB", xaxis_title="choice (kind=name)", height=420)

# %% [markdown]
# ## 3. The transducer loss: long utterances, large vocabulary
#
# Scenario `long-utterances` (a Transducer on 4-s utterances, 321 output symbols): the joiner's
# B × T × (U+1) × V logits and their gradient dominate. The sample-wise loss computes them one
# utterance at a time; the pruned loss runs the joiner on a band of `s_range` symbols per frame
# only (a cheap additive "simple" joint picks the band); sample-wise pruned does both. bf16 is
# here for contrast: it halves what it touches, but the loss itself is computed in fp32.
# **Look for:** the pruned peaks against the sample-wise one, and the step-time column (the
# pruned loss is the fastest). The full-size twin here is the paper's loss step (batch 1024 ×
# 40 s), which exists for batched and sample-wise only: "-" for the others.

# %%
asr = alternatives.compare("long-utterances", LOSS_CHOICES, repeats=REPEATS)
print(alternatives.format_rows(asr))

# %%
breakdown_figure(bars(asr), title="Live, long-utterances: memory at the peak of a training "
                 "step", unit="MiB", xaxis_title="choice (kind=name)", height=420)

# %% [markdown]
# ## 4. What each costs: step time against saving
#
# Every live row of sections 1-3 as a point: how much less memory (up) against how much more
# time per step (right), each measured beside its scenario's baseline in this process. **Look
# for:** the upper left is free lunch (bf16 on a CPU with bf16 kernels, the sample-wise and
# pruned losses); accumulation costs little here but takes K forward passes of B/K; the
# recomputing techniques (checkpoint, reversible) sit to the right. On a GPU the ratios differ
# (bf16 runs on tensor cores; small micro-batches use it less well): measure them there with
# `memlab compare`.

# %%
every = []
for name, rows in (("deep", deep), ("wide", wide), ("asr", asr)):
    every += [dict(r, run=f"{name}: {r['run']}") for r in rows
              if "refused" not in r and r["choices"]]
tradeoff_figure(every, subtitle="live on this CPU, one thread; each point against its "
                "scenario's baseline (deep-speaker, optimizer-bound, long-utterances)")

# %% [markdown]
# ## 5. When does it change the result?
#
# Saving memory is free only if training computes the same thing. The *drift* column measures
# it: every run starts from the same weights and takes the same steps on the same batch; drift
# is the distance of its parameter change from the baseline's, relative to the baseline's. It
# is 0 where the technique computes the same update (checkpointing, the step in backward, the
# sample-wise loss) and "-" where the network itself differs (reversible blocks). To read the
# other numbers, the row *baseline, another batch* is the baseline's drift on another random
# batch: Adam's first steps are about lr × sign(gradient), so any change flips the small
# components, and a drift below that row's is smaller than the difference between two batches.
# **Look for:** 8-bit states drift least, 4-bit more, bf16 more again, all below *another
# batch*; accumulation drifts about as much as another batch would, because these nets have
# BatchNorm, which normalises each micro-batch by its own statistics (the *changes* column says
# so; the Transducer has none); the pruned loss drifts: it is another loss.

# %%
rows = []
for name, group in (("deep-speaker", deep), ("optimizer-bound", wide),
                    ("long-utterances", asr)):
    for r in group:
        if "refused" in r:
            continue
        rows.append({"scenario": name, "run": r["run"],
                     "drift": "-" if r["drift"] is None else f"{r['drift']:.2g}",
                     "changes": r["changes"]})
print(format_table(rows))

# %% [markdown]
# ### 4-bit states at every step, not only at the end
#
# Drift looks at a few steps. Over a whole run the question is whether a low-bit optimizer's
# loss follows fp32 Adam's at *every* step. `memlab.bench.curves.loss_curves` trains the
# optimizer tests' small MLP (full batches, the same initialization, a few seconds) with fp32
# Adam, Adam8bit, Adam4bit (its default, dithered rounding) and Adam4bit rounded to the
# nearest of its 16 values, as in the paper. **Look for:** the dashed red curve (nearest)
# dropping later than the others around steps 40-70 and its gap (bottom panel) climbing to
# ~40%, while 8-bit and dithered 4-bit stay inside the shaded 5% band. With 16 values an EMA's
# small increment, (1 - beta) x (g - m), is less than half the gap to the next value, so
# rounding to the nearest drops it and the moments stall; dithered rounding stores the upper
# value with the probability that keeps the stored moment unbiased.

# %%
from memlab.bench.curves import curve_gaps, loss_curves
from memlab.plots import loss_curves_figure

curves = loss_curves(steps=80 if FAST else 200)
for name in ("adam8bit", "adam4bit", "adam4bit nearest"):
    worst, at, _ = curve_gaps(curves[name], curves["adam"])
    print(f"{name:17s} worst at step {at:3d}: {worst:6.1%} from fp32 Adam")
loss_curves_figure(curves)

# %% [markdown]
# What the short runs above cannot show is the trained metric. The measured ones (README
# "Results", 2-core CPU): 8-bit states leave the EER within ±0.01 of fp32 in every seed
# (`OMP_NUM_THREADS=1 memlab compare --task speaker --optimizer sgd,sgd8bit,adam,adam8bit
# --seed S`); reversible blocks are within noise of vanilla over 5 seeds (`--memory
# vanilla,checkpoint,reversible,reversible-full`); the sample-wise loss reaches the batched
# loss's TER (`memlab compare --task asr --loss batched,samplewise`); bf16 trains the
# Transducer to the same TER (0.351 sample-wise fp32 and bf16) and the pruned loss at least as
# well as the full one (0.279 fp32, 0.276 bf16), with 38% less memory for bf16 (`memlab compare
# --task asr --precision fp32,bf16 --loss samplewise,pruned --lr 6e-3 --steps 300`); 4-bit
# Adam, dithered, follows fp32 Adam's curve within 3.9% at every step (the figure above), and
# its drift from fp32 Adam on heavy-tailed gradients is 0.79 against Adam8bit's 0.10 (`memlab
# bench optim`). For bf16 and
# accumulation, train both yourself: `memlab compare --scenario deep-speaker --precision
# fp32,bf16` (about 2 minutes a run).
#
# ### What a technique refuses
#
# Some combinations cannot work, and `Config.validate` says so before a step runs. A step in
# backward frees each gradient as soon as it is used, so nothing that needs all of them after
# backward can run with it: accumulation (it sums gradients over micro-batches), the fp16
# gradient scaler (it unscales and checks them all), global-norm gradient clipping (it needs
# the norm of all of them: memlab registers no clipping, and a hand-written
# `clip_grad_norm_` after backward would see no gradients) and LowRankAdam (it steps the model
# as a whole). **Look for:** one line for each, naming both techniques.

# %%
for r in alternatives.compare("optimizer-bound", REFUSED, repeats=1, full_size=False,
                              reference=False):
    if "refused" in r:
        print(f"{r['run']}:\n    {r['refused']}")

# %% [markdown]
# ### The pruned loss is another loss unless its band covers the lattice
#
# On a small lattice (4 utterances, 16 frames, U = 6 tokens, float64), the pruned loss's band
# part against the exact RNN-T loss of the same joiner (`alternatives.pruned_gap`). **Look
# for:** the gap is 0 from s_range = U+1 = 7 on (the band is the whole lattice: the same loss),
# and positive below: paths outside the band are dropped, so the loss is an upper bound of the
# true one, and its gradients differ. The scenario's default `s_range` is 5.

# %%
gap = alternatives.pruned_gap(S_RANGES)
print(format_table([{"s_range": g["s_range"], "pruned loss": g["pruned"],
                     "RNN-T loss": g["full"], "gap": f"{100 * g['gap']:.2f}%"} for g in gap]))
fig = go.Figure(go.Scatter(x=[g["s_range"] for g in gap], y=[100 * g["gap"] for g in gap],
                           mode="lines+markers", name="pruned - exact",
                           hovertemplate="s_range %{x}<br>gap %{y:.3g}%<extra></extra>"))
fig.add_vline(x=7, line=dict(color="#999", dash="dot"))
fig.add_annotation(x=7, y=100 * max(g["gap"] for g in gap), text="s_range = U+1",
                   showarrow=False, xanchor="left", xshift=4)
fig.update_layout(template="plotly_white", height=360, showlegend=False,
                  title=dict(text="<b>Pruned RNN-T loss against the exact loss</b> · "
                             "4 utterances, T=16, U=6, V=12", x=0.01),
                  xaxis=dict(title="s_range (symbols kept per frame)", dtick=1),
                  yaxis=dict(title="(pruned − exact) / exact (%)", rangemode="tozero"))
fig

# %% [markdown]
# ## 6. Combinations
#
# Techniques that act on different tensors multiply: reversible blocks remove activations,
# 8-bit states shrink the optimizer state, bf16 halves what is left of the activations, the step
# in backward removes most gradients. **Look for:** the live and full-size savings of the
# stacks, against the single choices of section 1.

# %%
combos = alternatives.compare("deep-speaker", COMBINATIONS, repeats=REPEATS, reference=False)
print(alternatives.format_rows(combos))
breakdown_figure(bars(combos, full=True), title="Full size "
                 f"({scenarios.full_size('deep-speaker', {})['label']}): combinations",
                 unit="GiB", xaxis_title="choice (kind=name)", height=440,
                 limit=11 * 10**9 / 2**30, limit_label="RTX 2080 Ti (11 GB)")

# %% [markdown]
# ### What the planner picks
#
# `planner.plan` searches every registered combination (`PLAN_KINDS = None`: every kind) for
# DF-ResNet233 at batch 128 × 200 frames, against the configuration as given: vanilla, fp32,
# Adam, no accumulation, the step after backward. It lists what fits into `FIT`, cheapest first
# by the benchmarks' measured step-time ratios; `plan_summary` reads off the cheapest and the
# smallest as ratios to vanilla/fp32/Adam. **Look for:** the ratio of the smallest against the
# seed paper's 16.2× (reversible + 8-bit alone: notebook 05's 15.2×), and which choices it
# needs; "not measured" marks a technique whose step-time ratio is not in
# `planner.MEASURED`, which is why such combinations rank after the measured ones.

# %%
twin = s.fast_twin if FAST else s.twin
full_cfg = Config(task=s.task, **dict(twin.overrides))
result = planner.plan(full_cfg, FIT, frames=twin.frames, num_classes=twin.num_classes,
                      kinds=PLAN_KINDS, verify=4 if FAST else 12, time_budget=PLAN_SECONDS)
print(planner.format_plan(result))
summary = alternatives.plan_summary(result)
print(f"\n{twin.label}: as given (vanilla / fp32 / Adam) {format_bytes(summary['base_peak'])}")
for key in ("cheapest", "smallest"):
    r = summary[key]
    if r is None:
        print(f"{key}: nothing fits into {FIT}")
    else:
        print(f"{key:9s} {r['run']}: {format_bytes(r['peak'])}, {r['ratio']:.1f}x less")

# %% [markdown]
# ## Exercises
#
# 1. Add `"accumulation=8"` (any K works: `accumulateK` or `K`) to `ACTIVATION_CHOICES`. Does
#    the saving keep growing as 1/K? What sets the floor?
# 2. Train instead of stepping: `memlab compare --scenario deep-speaker --precision fp32,bf16
#    --accumulation none,accumulate4`. Do bf16 and accumulation change the EER on unseen
#    speakers? Compare with the drift of section 5.
# 3. After section 5, set the loss's band to the lattice: `scenarios.config("long-utterances",
#    loss="pruned")` builds a Transducer with `prune_range`; which `s_range` makes it the exact
#    loss for 4-s utterances of ~14 tokens, and what is its memory then?
# 4. Plan for a smaller card: `FIT = "4GiB"`. Which kinds does the planner now need, and which
#    one costs the most step time?
# 5. With a GPU: `memlab compare --device cuda --scenario deep-speaker --precision fp32,bf16,fp16
#    --offload none,host`. Where do the offloaded activations go (`host_peak`), and what does
#    the copy cost?
