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
# # 03 · The sample-wise transducer loss
#
# A transducer (RNN-T) speech recognizer has three parts: an **encoder** turns T frames of audio
# into T vectors, a **predictor** turns the U target tokens into U+1 vectors (one before each
# token and one after the last), and a small **joiner** combines *every* frame with *every*
# predictor position and scores all V tokens of the vocabulary there. The loss sums over every
# alignment of the U tokens to the T frames, so it needs all of those scores at once:
#
# $$\text{logits} \in \mathbb{R}^{B \times T \times (U+1) \times V}$$
#
# For a batch of 1024 utterances of 40 s (T = 1000 frames of 40 ms, U = 200 tokens) and
# V = 1024 subwords that is 843 GB of fp32 logits, and backward needs a gradient just as large.
# Braun, McDermott and Hsiao (*Neural Transducer Training: Reduced Memory Consumption with
# Sample-wise Computation*, ICASSP 2023, arXiv 2211.16270) never build it: they run the joiner,
# the loss and its gradient **one sample at a time**, keep only the small gradients of the
# encoder and predictor outputs (no V axis), and train that batch in **6 GB**.
#
# `memlab.transducer` has three implementations of the same loss:
#
# | function | what it is |
# |---|---|
# | `rnnt_loss_reference` | the forward recursion in plain PyTorch, for reading and for tests |
# | `rnnt_loss_batched` | the whole 4-D tensor at once (torchaudio's fused kernel, or memlab's on CPU) |
# | `samplewise_rnnt_loss` | joiner + loss + gradient one sample (or a small group) at a time |
#
# This notebook walks through the lattice the loss is defined on, computes what the 4-D tensor
# costs, measures both losses, and trains the same small ASR model with each.
#
# **How to run:** *Run ▸ Run All Cells*. A few minutes on a laptop CPU; with the environment
# variable `MEMLAB_FAST=1` it uses tiny sizes and finishes in under a minute.

# %% [markdown]
# Every size the notebook uses is in the next cell (tagged `parameters`). `FAST` picks tiny sizes
# for tests and CI; the memory figures then still show the effect, but the training runs are far
# too short to learn anything: read section 5 from a full run.

# %% tags=["parameters"]
from memlab import fast_mode

FAST = fast_mode()                      # MEMLAB_FAST=1: tiny sizes (tests, CI)
LATTICE_T, LATTICE_U, LATTICE_V = 12, 4, 6      # the tiny example of section 1
CALC_START = (32, 8.0, 512)                     # calculator: batch, seconds, vocabulary
BENCH_BATCH = 4 if FAST else 32                 # section 3: the loss step alone
BENCH_SECONDS = 2.0 if FAST else 4.0
BENCH_VOCAB = 64 if FAST else 512
GROUP_SIZES = [1, 2, 4] if FAST else [1, 2, 4, 8, 16]
BATCH_SIZES = [2, 4] if FAST else [8, 16, 32, 64]
REPEATS = 1 if FAST else 2                      # timed repeats per measurement
STEP_FRAMES = 800                               # whole training step: 8 s utterances
STEP_VOCAB = 512
STEP_BATCH = 4 if FAST else 8
# the dashboard runs (section 5): Config fields on top of Config.for_task("asr")
LAB = dict(steps=6, lr=6e-3) if FAST else dict(steps=300, lr=6e-3, width=128)

# %%
import ipywidgets as W
import plotly.graph_objects as go
import torch
from IPython.display import HTML, display
from plotly.subplots import make_subplots

from memlab.bench import transducer as bench
from memlab.lab import Config
from memlab.memory import MemoryMeter, format_bytes
from memlab.report import format_table
from memlab.transducer import (chunk_bytes, plan_chunks, rnnt_forward_variables,
                               rnnt_loss_batched, rnnt_loss_reference)
from memlab.ui.figures import breakdown_figure, log_range, reference_line, timeline_figure
from memlab.ui.measure import measure_step, sweep
from memlab.widgets import MemoryLab

torch.manual_seed(0)
GB = 1e9

# %% [markdown]
# ## 1. The lattice and its forward variables
#
# Put the T encoder frames on one axis and the U+1 predictor positions on the other. An
# *alignment* is a path from (t, u) = (0, 0) that at every cell either emits **blank** and
# moves to the next frame (t+1, u), or emits the next token y<sub>u+1</sub> and moves up to
# (t, u+1); it ends with a blank from (T−1, U). The joiner scores all V tokens at every cell,
# which is where the T × (U+1) × V comes from. The loss is −log of the summed probability of
# all paths, computed by the forward variables (Graves 2012):
#
# $$\alpha(t, u) = \operatorname{logaddexp}\big(\alpha(t-1, u) + \log p(\varnothing \mid t-1, u),\;
# \alpha(t, u-1) + \log p(y_u \mid t, u-1)\big), \qquad
# \mathcal{L} = -\big(\alpha(T-1, U) + \log p(\varnothing \mid T-1, U)\big)$$
#
# Here are made-up logits for one utterance of `LATTICE_T` frames and `LATTICE_U` tokens that
# favour one alignment (token *k* at frame `align[k]`, blank everywhere else).
# `rnnt_forward_variables` returns α(t, u) from the reference implementation.
# **Look for:** on the left, α falls with every step (it is a log-probability of a growing
# path prefix), least along the favoured path (white line); on the right, each frame's α
# normalised over u: where the paths are at frame t. The mass moves up one row at each
# favoured emission, with some spread where the logits are less sure.

# %%
g = torch.Generator().manual_seed(0)
T, U, V = LATTICE_T, LATTICE_U, LATTICE_V
targets = torch.randint(1, V, (1, U), generator=g)                    # (1, U) tokens, 0 is blank
align = torch.linspace(1, T - 2, U).round().long()                    # (U,) frame of each token
logits = 0.7 * torch.randn(1, T, U + 1, V, generator=g)               # (B, T, U+1, V)
for u in range(U + 1):
    for t in range(T):
        if u < U and t == align[u]:
            logits[0, t, u, targets[0, u]] += 4.0                     # emit y_{u+1} here
        else:
            logits[0, t, u, 0] += 2.0                                 # otherwise blank
lengths, target_lengths = torch.tensor([T]), torch.tensor([U])
alpha = rnnt_forward_variables(logits, targets, lengths, target_lengths)[0]   # (T, U+1)

path_t, path_u = [0], [0]                       # the favoured path, cell by cell
for t in range(T):
    for u in range(U):
        if align[u] == t:
            path_t.append(t), path_u.append(u + 1)
    if t + 1 < T:
        path_t.append(t + 1), path_u.append(path_u[-1])
share = (alpha - alpha.logsumexp(dim=1, keepdim=True)).exp()          # (T, U+1) per frame

fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.14,
                    subplot_titles=("log α(t, u) (nats)", "share of α at frame t"))
fig.add_heatmap(z=alpha.T.tolist(), x=list(range(T)), y=list(range(U + 1)), colorscale="Viridis",
                colorbar=dict(title="nats", x=0.43), row=1, col=1,
                hovertemplate="t=%{x}, u=%{y}<br>log α=%{z:.2f}<extra></extra>")
fig.add_heatmap(z=share.T.tolist(), x=list(range(T)), y=list(range(U + 1)), colorscale="Blues",
                zmin=0, zmax=1, colorbar=dict(title="share", x=1.0), row=1, col=2,
                hovertemplate="t=%{x}, u=%{y}<br>share=%{z:.2f}<extra></extra>")
for col in (1, 2):
    fig.add_scatter(x=path_t, y=path_u, mode="lines", line=dict(color="white", width=2),
                    name="favoured path", showlegend=False, row=1, col=col)
fig.update_xaxes(title_text="encoder frame t", dtick=1)
fig.update_yaxes(title_text="tokens emitted u", dtick=1)
fig.update_layout(template="plotly_white", height=380,
                  title=f"<b>The RNN-T lattice</b> · T = {T} frames, U = {U} tokens, V = {V}"
                        " · white line: the favoured path")
fig

# %% [markdown]
# The loss read off the top-right corner of the lattice agrees with the reference
# implementation (float64) and with torchaudio's fused kernel (`rnnt_loss_batched(...,
# kernel="torchaudio")`, float32).
# **Look for:** three equal numbers.

# %%
log_probs = logits.double().log_softmax(-1)                            # (1, T, U+1, V)
from_alpha = -(alpha[T - 1, U] + log_probs[0, T - 1, U, 0])
ref = rnnt_loss_reference(logits.double(), targets, lengths, target_lengths)
batched = rnnt_loss_batched(logits, targets, lengths, target_lengths, kernel="torchaudio")
print(f"loss from alpha {float(from_alpha):.6f}   reference {float(ref):.6f}   "
      f"torchaudio {float(batched):.6f}")
print(f"cells in the lattice: T x (U+1) = {T * (U + 1)}; logits for them: "
      f"T x (U+1) x V = {T * (U + 1) * V} numbers for one utterance")

# %% [markdown]
# ## 2. What the 4-D tensor costs: a calculator
#
# `bench.loss_memory` does the arithmetic for a batch of equally long utterances: T = 25
# encoder frames per second (10 ms fbank frames, subsampled 4×) and U = 5 tokens per second
# (an assumed subword rate), fp32, a joiner of width 144 like memlab's. The **batched** loss
# holds the B × T × (U+1) × V logits, torchaudio's gradient of them (it computes it in forward),
# and the joiner's B × T × (U+1) × 144 hidden activations. The **sample-wise** loss holds the same
# for one group of samples only: `plan_chunks` packs samples into groups whose logits +
# gradient fit `max_chunk_bytes` (default 64 MiB). Both hold the encoder and predictor outputs
# and their gradients. Totals are from `bench.estimate_bytes`, which section 3 checks against
# measurements.
#
# Move the sliders. **Look for:** the batched total grows with the *product* of all three; the
# sample-wise total barely moves with the batch size, because only the group is B-sized.
# (The y axis is logarithmic: each grid line is ten times the one below; the dotted lines are two
# GPU sizes.)

# %%
GPUS = ((80, "H100 (80 GB)"), (16, "16 GB GPU"))     # reference lines, GB


def calculator(batch_size, seconds, vocab_size):
    m = bench.loss_memory(batch_size, seconds, vocab_size)
    gb = [m["batched_bytes"] / GB, m["samplewise_bytes"] / GB]
    fig = go.Figure(go.Bar(
        x=["batched", "sample-wise"], y=gb, marker_color=["#E45756", "#4C78A8"], width=0.5,
        text=[f"{v:.3g} GB" for v in gb], textposition="outside", cliponaxis=False,
        name="loss step", hovertemplate="%{x}: %{y:.3g} GB<extra></extra>"))
    # the range follows the bars and the GPU lines: half a decade of room below and above
    fig.update_layout(template="plotly_white", height=360, width=560,
                      title=f"<b>Loss step</b> · B={batch_size}, {seconds:g} s "
                            f"(T={m['T']}, U={m['U']}), V={vocab_size}",
                      yaxis=dict(title="memory of the loss step (GB, log scale)", type="log",
                                 dtick=1, range=log_range(gb + [g for g, _ in GPUS],
                                                          below=0.5, above=0.5)),
                      xaxis=dict(title="method"), margin=dict(t=60, b=50))
    for g, name in GPUS:
        reference_line(fig, g, name)
    fig.show()
    display(HTML(
        f"<div style='font-size:13px;line-height:1.5'>"
        f"logits B×T×(U+1)×V: <b>{format_bytes(m['logits_bytes'])}</b> · their gradient: "
        f"<b>{format_bytes(m['gradient_bytes'])}</b> · joiner hidden: "
        f"{format_bytes(m['joiner_hidden_bytes'])}<br>sample-wise groups of "
        f"<b>{m['group_size']}</b> sample(s): logits + gradient "
        f"<b>{format_bytes(m['group_bytes'])}</b> per call · saving "
        f"<b>{m['ratio']:.0f}×</b></div>"))


b0, s0, v0 = CALC_START
W.interact(calculator,
           batch_size=W.IntSlider(value=b0, min=1, max=1024, step=1, description="batch",
                                  continuous_update=False),
           seconds=W.FloatSlider(value=s0, min=1, max=60, step=1, description="seconds",
                                 continuous_update=False),
           vocab_size=W.SelectionSlider(options=[2 ** k for k in range(5, 14)], value=v0,
                                        description="vocabulary", continuous_update=False));

# %% [markdown]
# The paper's setting, and how both totals grow with the batch at 40 s and V = 1024.
# **Look for:** the batched line crosses an 80 GB GPU at a handful of utterances; the
# sample-wise line stays at a few GB up to 1024 (the paper's 6 GB includes the encoder and
# predictor, which this loss-only arithmetic leaves out).

# %%
paper = bench.loss_memory(1024, 40.0, 1024)
print(f"B=1024 x 40 s, V=1024: logits {paper['logits_bytes'] / GB:,.0f} GB, batched loss step "
      f"{paper['batched_bytes'] / GB:,.0f} GB, sample-wise {paper['samplewise_bytes'] / GB:.1f} GB "
      f"({paper['ratio']:.0f}x less)")
batches = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
curves = {m: [bench.loss_memory(b, 40.0, 1024)[f"{m}_bytes"] / GB for b in batches]
          for m in ("batched", "samplewise")}
fig = go.Figure()
fig.add_scatter(x=batches, y=curves["batched"], name="batched", mode="lines+markers",
                line=dict(color="#E45756"))
fig.add_scatter(x=batches, y=curves["samplewise"], name="sample-wise", mode="lines+markers",
                line=dict(color="#4C78A8"))
fig.update_layout(template="plotly_white", height=380,
                  title="<b>Estimated loss-step memory</b> · 40 s utterances, V = 1024",
                  xaxis=dict(title="batch size (utterances, log scale)", type="log",
                             tickvals=batches),
                  yaxis=dict(title="memory of the loss step (GB, log scale)", type="log"))
reference_line(fig, 80, "H100 (80 GB)")                # after type="log": labels at log10(y)
reference_line(fig, 6, "paper: 6 GB", dash="dash")
fig

# %% [markdown]
# ## 3. Measured: the loss step alone
#
# Now real tensors on this machine. `bench.make_problem` makes random encoder outputs
# (B, T, 144), predictor outputs (B, U+1, 144), targets and a joiner; `bench.loss_step` runs one
# loss and `backward()`. The encoder and predictor are left out: they cost the same with either
# loss. First the `MemoryMeter` timeline of one step with each loss, on the same problem.
# **Look for:** the batched step is one tall block (the 4-D logits, torchaudio's gradient of
# them and the joiner's hidden activations all alive together); the sample-wise step is a row
# of small teeth, one per group, each freed before the next.

# %%
Tb, Ub = bench.sizes(BENCH_SECONDS)
problem = bench.make_problem(BENCH_BATCH, Tb, Ub, BENCH_VOCAB)
group = 2 if BENCH_BATCH >= 4 else 1
meters = {}
for method, budget in (("batched", None), ("samplewise", chunk_bytes(group, Tb, Ub, BENCH_VOCAB))):
    joiner, enc, pred, tg, el, tl = problem
    with MemoryMeter("cpu", model=joiner, inputs=[enc, pred, tg, el, tl]) as meters[method]:
        bench.loss_step(method, *problem, max_chunk_bytes=budget)
    joiner.zero_grad(set_to_none=True)
    enc.grad = pred.grad = None
ymax = 1.1 * meters["batched"].peak / 2 ** 20
for method, m in meters.items():
    fig = timeline_figure(m, title=f"{method} loss step · B={BENCH_BATCH}, {BENCH_SECONDS:g} s, "
                                   f"V={BENCH_VOCAB} · peak {format_bytes(m.peak)}", height=320)
    fig.update_yaxes(range=[0, ymax])
    fig.show()

# %% [markdown]
# The group size is the sample-wise loss's one knob: larger groups run more of the batch in
# one call (faster on a parallel device), smaller ones hold less. `bench.budget_sweep` sets
# `max_chunk_bytes` to fit exactly n samples and measures peak and time side by side with the
# batched loss. **Look for:** the peak grows with n (a group costs about n / B of the batched
# 4-D tensors), while the time ratio stays near 1 for every n. The work is the same either way;
# on a CPU one sample's T × (U+1) × V tensor is already large enough to keep the cores busy
# (and fits the caches better), so on a shared machine the ratio moves more with the load than
# with n. A GPU is different: small groups leave it idle, so there give the loss as large a
# budget as the memory allows.

# %%
sweep_rows = bench.budget_sweep(BENCH_BATCH, BENCH_SECONDS, BENCH_VOCAB, GROUP_SIZES,
                                repeats=REPEATS)
print(format_table(sweep_rows, ["method", "group_size", "chunks", "peak_mib", "peak_ratio",
                                "time_ratio", "cpu_time_ratio"]))
sw = [r for r in sweep_rows if r["method"] == "samplewise"]
fig = make_subplots(specs=[[{"secondary_y": True}]])
fig.add_bar(x=[str(r["group_size"]) for r in sw], y=[r["peak_mib"] for r in sw],
            name="sample-wise peak", marker_color="#4C78A8")
fig.add_scatter(x=[str(r["group_size"]) for r in sw], y=[r["time_ratio"] for r in sw],
                name="time / batched time", mode="lines+markers", line=dict(color="#333"),
                secondary_y=True)
reference_line(fig, sweep_rows[0]["peak_mib"],
               f"batched peak {sweep_rows[0]['peak_mib']:.1f} MiB", color="#E45756",
               dash="dash")
fig.update_layout(template="plotly_white", height=380,
                  title=f"<b>Group size: memory against time</b> · B={BENCH_BATCH}, "
                        f"{BENCH_SECONDS:g} s, V={BENCH_VOCAB}")
fig.update_xaxes(title_text="samples per joiner/loss call (group size)", type="category")
fig.update_yaxes(title_text="peak of the loss step (MiB)", secondary_y=False, rangemode="tozero")
fig.update_yaxes(title_text="time ratio (sample-wise / batched)", secondary_y=True,
                 rangemode="tozero")
fig

# %% [markdown]
# And the peak against the batch size at the default budget (64 MiB a call), memory only
# (`repeats=0`). **Look for:** batched grows in proportion to B; sample-wise grows only by the
# encoder/predictor outputs and their gradients, which are B-sized but have no V axis.

# %%
rows = bench.run(batch_sizes=BATCH_SIZES, seconds=[BENCH_SECONDS], vocab_sizes=[BENCH_VOCAB],
                 repeats=0, methods=bench.METHODS)
fig = go.Figure()
for method, color in (("batched", "#E45756"), ("samplewise", "#4C78A8")):
    mine = [r for r in rows if r["method"] == method]
    fig.add_scatter(x=[r["batch_size"] for r in mine], y=[r["peak_mib"] for r in mine],
                    name=method, mode="lines+markers", line=dict(color=color))
fig.update_layout(template="plotly_white", height=360,
                  title=f"<b>Measured peak of the loss step</b> · {BENCH_SECONDS:g} s, "
                        f"V={BENCH_VOCAB}",
                  xaxis=dict(title="batch size (utterances)", tickvals=BATCH_SIZES),
                  yaxis=dict(title="peak of the loss step (MiB)", rangemode="tozero"))
fig

# %% [markdown]
# ## 4. Measured: a whole training step of the ASR model
#
# The loss is one part of a training step. `sweep` measures the steady-state step (forward,
# backward, Adam) of memlab's `Transducer` (conv subsampling, 2 Transformer layers of width 96,
# LSTM predictor, joiner) on random input, once with each loss, at two sizes: the toy task the
# dashboard trains below (12 tokens, about 1.6 s), and `STEP_FRAMES` frames with a
# `STEP_VOCAB`-token vocabulary. **Look for:** at the toy size the two bars are the same (the
# step's peak is in the encoder's backward, and the 4-D tensor is small); at the larger size the
# batched step peaks at the loss and the sample-wise step does not.

# %%
toy = Config.for_task("asr", batch_size=STEP_BATCH)
big = toy.replace(vocab_size=STEP_VOCAB)
rows = []
for name, cfg, frames in (("toy: V=12, 1.6 s", toy, 164),
                          (f"V={STEP_VOCAB}, {STEP_FRAMES / 100:g} s", big, STEP_FRAMES)):
    for r in sweep(cfg, "loss", ["batched", "samplewise"], frames=frames):
        rows.append(dict(r, label=f"{name}<br>{r['loss']}"))
print(format_table([{"run": r["label"].replace("<br>", " "), "peak": r["peak"],
                     "activations": r["activations"], "gradients": r["gradients"]}
                    for r in rows]))
breakdown_figure(rows, title=f"One training step of the Transducer (B={STEP_BATCH}, Adam)",
                 xaxis_title="size and loss")

# %% [markdown]
# ## 5. Train with both losses in the dashboard
#
# The sample-wise loss computes the same numbers, so training with it should follow the same
# path. The dashboard trains the toy ASR task (synthetic speech: 11 tokens with different
# spectral shapes, 3 to 8 per utterance, 8 speakers) with a `Transducer` and Adam, and
# evaluates the token error rate (TER) of greedy decoding on held-out utterances: 0 is perfect,
# 1 is what an empty transcript scores (an untrained model scores far above 1: it inserts
# tokens at almost every frame). `LAB` sets a model of width 128, 300 steps and Adam at
# lr 6e-3, which reaches a TER of about 0.35 in a minute or two of CPU time per run. Both runs use
# the same seed, so they see the same batches in the same order. The `loss` dropdown switches
# the loss; the next cells use it from code.

# %%
lab = MemoryLab(task="asr", **LAB)
lab.show()

# %% [markdown]
# Two runs, one per loss (the same as choosing the loss and pressing **Run**). **Look for:** the
# two loss curves on top of each other, the same TER at every evaluation, the same peak (this is
# the toy size of section 4), and the step time in the table.

# %%
runs = {loss: lab.run(block=True, task="asr", loss=loss) for loss in ("batched", "samplewise")}
summary = []
for loss, recs in runs.items():
    evals = [r for r in recs if r.metrics]
    plain = sorted(r.seconds for r in recs if not r.metered and r.step > 1) or [recs[-1].seconds]
    summary.append({"loss": loss, "steps": len(recs),
                    "peak": max(r.peak for r in recs if r.metered),
                    "step_s": plain[len(plain) // 2], "final_loss": recs[-1].loss,
                    "ter": evals[-1].metrics["ter"]})
print(format_table(summary))
diff = max(abs(a.loss - b.loss) for a, b in zip(runs["batched"], runs["samplewise"]))
print(f"largest difference between the two training-loss curves: {diff:.2e}")

# %% [markdown]
# ## Exercises
#
# 1. **Read the lattice.** In section 1, move one entry of `align` two frames later. How do the
#    two heatmaps change? What happens to the loss if you make the emission boost 0 (no
#    favoured alignment)?
# 2. **Your GPU.** With the calculator, find the longest utterance at which a batch of 64 with
#    a 4096-token vocabulary still fits into 80 GB with the batched loss. And with sample-wise?
# 3. **The budget.** Re-run `bench.budget_sweep` with `length_spread=0.5` (utterances between
#    half and full length). How many calls does the default 64 MiB budget make now, and why
#    does grouping short utterances matter more on a GPU than on this CPU?
# 4. **When does it pay?** In section 4, find the smallest vocabulary at which the sample-wise
#    step's peak is clearly below the batched one for `STEP_FRAMES` frames. Why does that
#    threshold fall as the utterances get longer?
# 5. **Where is the peak?** For the toy size of section 4, draw the step's timeline with
#    `timeline_figure(measure_step(toy, frames=164))` for each loss. In which phase is the
#    peak, and which layers hold the memory there (hover over the areas)? What would lower it?
# 6. **The joiner's gradients.** `samplewise_rnnt_loss(..., accumulate_joiner_grads=True)`
#    adds the joiner's parameter gradients to `.grad` during the forward call, as the paper
#    does. What does it save, and what breaks if you call the loss twice before one
#    `backward()`?
