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
# # 01 · Reversible networks: recompute activations instead of storing them
#
# Notebook 00 showed that the *activations* dominate training memory, and that they grow with
# every block you add: ordinary backpropagation keeps each block's intermediate tensors until
# backward comes back to it. Two ways out:
#
# * **checkpointing** (`torch.utils.checkpoint`): keep only each block's *input*, recompute the
#   block in backward. Memory still grows with depth, one stored input per block.
# * **reversible blocks** (Gomez et al. 2017, *The Reversible Residual Network*): make each block
#   invertible, so its input can be *rebuilt from its output*. Nothing is stored per block, and
#   activation memory stops growing with depth. Liu & Qian (*Memory-Efficient Training for Deep
#   Speaker Embedding Learning in Speaker Verification*, arXiv 2412.01195) build partially and
#   fully reversible ResNets and DF-ResNets for speaker verification this way.
#
# This notebook: (1) the coupling that makes a block invertible, on numbers you can check by
# hand; (2) how exact the reconstruction is; (3) activation memory against depth for the four
# strategies of `memlab`; (4) a live training run in the `MemoryLab` dashboard; (5) what it
# costs in time; (6) when checkpointing is the better choice, measured on paper-size models.
#
# **How to run:** *Run ▸ Run All Cells*. A few minutes on a laptop CPU; with the environment
# variable `MEMLAB_FAST=1` it uses tiny sizes and finishes in under a minute (the numbers are
# then too small to mean much; read the figures from a full run).

# %% [markdown]
# Every size this notebook uses is in the next cell (tagged `parameters`, so papermill & co.
# can override it). `FAST` picks tiny sizes for tests and CI.

# %% tags=["parameters"]
from memlab import fast_mode

FAST = fast_mode()                      # MEMLAB_FAST=1: tiny sizes (tests, CI)
RECON_DEPTHS = [1, 4, 16] if FAST else [1, 2, 4, 8, 16, 32, 64]   # couplings in one stage
BENCH_DEPTHS = [2, 8] if FAST else [4, 8, 16, 32]     # blocks in stage 3 of the bench ResNet
LAB_DEPTH = 1                          # blocks per stage of the dashboard's ResNet
LAB_BATCH = 4 if FAST else 32          # utterances per training step in the dashboard
LAB_STEPS = 6 if FAST else 150         # training steps per dashboard run (the lab default)
WHATIF_MODELS = ["tiny-ResNet"] if FAST else ["ResNet34", "DF-ResNet56"]
WHATIF_BATCH = 16 if FAST else 128     # utterances of 200 frames (2 s) per step

# %%
import torch
import plotly.graph_objects as go
from torch import nn

from memlab.bench import reversible as study
from memlab.report import format_table, run_summary
from memlab.reversible import AdditiveCoupling
from memlab.ui.figures import breakdown_figure, timeline_figure
from memlab.widgets import MemoryLab

torch.manual_seed(0)
torch.set_num_threads(1)     # tiny models: one thread is as fast, and steadier on a shared CPU
STRATEGY_COLORS = {"vanilla": "#4C78A8", "checkpoint": "#F58518", "reversible": "#E45756",
                   "reversible-full": "#54A24B"}

# %% [markdown]
# ## 1. The additive coupling and its inverse
#
# Split a block's channels into two halves x₁, x₂ and update one half from the other:
#
# $$y_1 = x_1 + F(x_2), \qquad y_2 = x_2 + G(y_1)$$
#
# Given the output, undo the two steps in reverse order:
#
# $$x_2 = y_2 - G(y_1), \qquad x_1 = y_1 - F(x_2)$$
#
# F and G are *evaluated*, never inverted, so they can be anything: here F is a ReLU (which
# has no inverse!) and G a 2 × 2 linear map with weights you can read. The input has 4
# channels, so each half has 2. **Look for:** y₁ and y₂ computed by hand match the module's
# output, and `inverse(y)` gives back x exactly.

# %%
F = nn.ReLU()
G = nn.Linear(2, 2, bias=False)
with torch.no_grad():
    G.weight.copy_(torch.tensor([[1.0, 2.0], [0.0, -1.0]]))
coupling = AdditiveCoupling(f=F, g=G)

x = torch.tensor([[1.0, 2.0, -3.0, 4.0]])          # (B=1, C=4): x1 = [1, 2], x2 = [-3, 4]
with torch.no_grad():
    y = coupling(x)                                # (1, 4)
    y1_by_hand = x[:, :2] + F(x[:, 2:])            # [1, 2] + relu([-3, 4]) = [1, 6]
    y2_by_hand = x[:, 2:] + G(y1_by_hand)          # [-3, 4] + [1 + 12, -6] = [10, -2]
    x_back = coupling.inverse(y)                   # (1, 4)
print("x           ", x.tolist())
print("y           ", y.tolist())
print("by hand     ", torch.cat([y1_by_hand, y2_by_hand], dim=1).tolist())
print("inverse(y)  ", x_back.tolist())

# %% [markdown]
# In backward, a `ReversibleSequence` of such couplings starts from the stage's output (the only
# tensor it kept), rebuilds each block's input from its output with the inverse, recomputes F
# and G *with* autograd just for that block, back-propagates through them, and moves one block
# down. At any moment only one block's graph exists, however many blocks the stage has.
#
# ## 2. How exact is "exactly"?
#
# On a computer the subtractions of the inverse are rounded, and the rounding errors of one
# block feed into the next. `study.reconstruction_error` runs a stage of `depth` ResNet
# couplings (two 3 × 3 convolutions in each of F and G) forward, then inverts it, in fp32 and
# fp64, and compares the gradients of all parameters with ordinary autograd's.
# **Look for:** reconstruction errors near the unit roundoff of each format (fp32 ≈ 6e-8,
# fp64 ≈ 1e-16), growing with depth roughly as the activations grow (last column). The
# gradients follow them until, in a deep fp32 stage, a rebuilt value lands on the other side of
# a ReLU's kink: the mask flips and the gradient moves by a finite step, so the gradient error
# jumps (to about 1e-3 at depth 64 in a full run) while the reconstruction error stays near
# 1e-5. That is still far below the noise of a minibatch gradient, and fp64 (or a smooth
# activation such as GELU) does not show the jump.

# %%
recon = study.reconstruction_error(fast=FAST, depths=RECON_DEPTHS)
fig = go.Figure()
for dtype, dash in (("float32", "solid"), ("float64", "dot")):
    rows = [r for r in recon if r["dtype"] == dtype]
    fig.add_scatter(x=[r["depth"] for r in rows], y=[r["rel_error"] for r in rows],
                    mode="lines+markers", name=f"{dtype}: input rebuilt by the inverse",
                    line=dict(dash=dash, color="#4C78A8"))
    fig.add_scatter(x=[r["depth"] for r in rows], y=[r["grad_rel_error"] for r in rows],
                    mode="lines+markers", name=f"{dtype}: parameter gradients",
                    line=dict(dash=dash, color="#E45756"))
fig.update_layout(template="plotly_white", height=420,
                  title="Error of recomputing instead of storing (relative to the exact value)",
                  xaxis=dict(title="couplings in the stage (blocks, log scale)", type="log",
                             tickvals=sorted({r["depth"] for r in recon})),
                  yaxis=dict(title="relative error ‖x̂ − x‖ / ‖x‖ (dimensionless)",
                             type="log", exponentformat="power"))
fig

# %%
print(format_table(recon, ["depth", "dtype", "max_abs_error", "rel_error", "grad_rel_error",
                           "output_max"]))

# %% [markdown]
# ## 3. Activation memory against depth
#
# `study.run` builds a speaker ResNet whose third stage has `depth` blocks, once per strategy,
# and meters one training step of each on the same batch with `MemoryMeter` (the *activations*
# category: what forward keeps for backward, its live intermediates, and the recomputation in
# backward). The four strategies:
#
# | strategy | what a stage keeps for backward |
# |---|---|
# | `vanilla` | every intermediate of every block |
# | `checkpoint` | the input of every block (the block is recomputed in backward) |
# | `reversible` | nothing in the couplings; the strided first block of stages 2-4 stays ordinary |
# | `reversible-full` | nothing: the stage transitions are invertible too (space-to-depth) |
#
# **Look for:** vanilla grows by the same amount with every block. Checkpoint is flat at first
# and then grows with a much smaller slope: its stored inputs (one per block) only count once
# they outweigh the working set of the first, full-resolution stage in backward. The reversible
# lines stay flat. Where the lines start is set by what no strategy removes: the stem and the
# working set of one block in backward.

# %%
bench = study.run(fast=FAST, depths=BENCH_DEPTHS, threads=1)
fig = go.Figure()
# dashes and marker shapes too: two strategies with equal peaks stay visible on top of each other
for s, dash, symbol in zip(study.STRATEGIES, ("solid", "dash", "dot", "dashdot"),
                           ("circle", "square", "diamond", "triangle-up")):
    rows = [r for r in bench if r["strategy"] == s]
    fig.add_scatter(x=[r["depth"] for r in rows], y=[r["activation_bytes"] / 2**20 for r in rows],
                    mode="lines+markers", name=s, line=dict(color=STRATEGY_COLORS[s], dash=dash),
                    marker=dict(symbol=symbol, size=8))
r0 = bench[0]
fig.update_layout(template="plotly_white", height=420,
                  title=f"Activation peak of one training step (batch {r0['batch_size']} × "
                        f"{r0['frames']} frames, width {r0['width']})",
                  xaxis=dict(title="blocks in the third stage", tickvals=BENCH_DEPTHS),
                  yaxis=dict(title="activation peak (MiB)", rangemode="tozero"))
fig

# %% [markdown]
# ## 4. Live: train a reversible speaker model in the dashboard
#
# The same comparison on a model that trains for real. The dashboard's **activations** dropdown
# picks the strategy. The next cell shows the dashboard; the one after presses **Run** from code
# twice, first with `vanilla` and then with `reversible` (same seed, same data, parameter counts
# equal to within 0.2 %), and waits for both. Try the other strategies with the
# controls afterwards.

# %%
lab = MemoryLab(task="speaker", depth=LAB_DEPTH, batch_size=LAB_BATCH, steps=LAB_STEPS)
lab.show()

# %% [markdown]
# **Look for:** in *Memory at the peak*, the red activations segment of the reversible run is
# shorter; the loss curves of the two runs fall alike (they are different networks with equal
# parameter counts, so not on top of each other) and, in a full run, both EERs end far below
# chance (0.5) and close to each other (fast mode is too short to learn anything); the table
# shows the step-time price. Even at one block per stage the first stage is a coupling, and
# that is where the largest activations are.

# %%
runs = {}
for memory in ("vanilla", "reversible"):
    runs[memory] = lab.run(block=True, memory=memory)
for memory, records in runs.items():
    print(run_summary(memory, records, "activations"))

# %% [markdown]
# The timeline of the last metered step of each run, side by side. **Look for:** in vanilla,
# activations (red) pile up through forward and are released block by block in backward. In
# the reversible run, the rise in forward is smaller (the couplings keep nothing), and backward
# shows small teeth: one block's recomputed graph built and dropped at a time.

# %%
for memory, records in runs.items():
    last = [r for r in records if r.metered and r.timeline][-1]
    timeline_figure(last.timeline, title=f"{memory}: live bytes through step {last.step}",
                    height=300).show()

# %% [markdown]
# ## 5. The price: time
#
# Each coupling runs F and G once in forward and once more in backward (to rebuild and
# back-propagate), so the theory says about 4/3 of the compute of ordinary training; a
# checkpointed block is also recomputed once. The bench timed every strategy round-robin in one
# process (one thread), so the ratios compare like with like. **Look for:** ratios above 1 for
# every memory-saving strategy. The reversible backward itself costs about 4/3 of plain autograd
# through the *same* couplings; on a CPU the couplings also cost a little more than the
# BasicBlocks they replace (F and G convolve half the channels, and there are three BatchNorms'
# worth of channels instead of two), so expect up to ~1.5x vanilla at depth 32 here, less at
# small depth where the ordinary blocks and the stem dilute it. The full-size bench run
# (`memlab bench reversible`) uses the paper's widths (32, 80 fbank); fast mode is tiny.

# %%
print(format_table([{"depth": r["depth"], "strategy": r["strategy"], "params": r["params"],
                     "activation_bytes": r["activation_bytes"],
                     "activations vs vanilla": r["activation_ratio"],
                     "time vs vanilla": r["time_ratio"]} for r in bench]))

# %% [markdown]
# ## 6. When to prefer checkpointing
#
# Reversible blocks are not free of conditions, and checkpointing is often enough:
#
# * **Checkpointing works on any model**, including a pretrained one you want to fine-tune; a
#   reversible network is a *different architecture* (couplings instead of residual blocks, no
#   ReLU after the addition), so it must be trained as such.
# * **Where the peak sits matters.** A stage of N blocks costs N stored inputs with
#   checkpointing and nothing with couplings, but both still need the working set of one block
#   in backward (its recomputed graph and the gradients flowing through it), plus the stem.
#   That working set is largest in the first stage, at full frequency and time resolution, and
#   it is a floor neither method removes. When stages are shallow (ResNet34 has 3, 4, 6, 3
#   blocks) the floor decides the peak and the two end up close; checkpointing can even come
#   out slightly lower. Reversible blocks pull ahead when one stage is *deep*: DF-ResNet233 has
#   63 blocks in its third stage, and checkpointing's 63 stored inputs then lift its peak above
#   the floor, while the reversible peak does not move (exercise 3).
# * **Exactness.** Checkpointing recomputes the same numbers; a reversible backward works from
#   rebuilt activations, with the (tiny) errors of section 2, which grow in low precision.
# * **Time** is about the same price for both: one extra forward of the recomputed blocks.
#
# `study.full_size` measures one Adam training step of paper-size models at batch
# `WHATIF_BATCH` × 200 frames with 5,994 training speakers (VoxCeleb2) on fake tensors (shapes,
# no data), so it needs none of the memory it reports. **Look for:** how much of the vanilla
# bar each strategy removes, which category is left at the peak (the memory-saving strategies
# peak in backward with a large share of *gradients*: the first stage's working set), and
# whether checkpointing or reversible comes out lower for each model.

# %%
whatif = study.full_size(fast=FAST, models=WHATIF_MODELS, batch_size=WHATIF_BATCH)
breakdown_figure([dict(r, label=f"{r['model']}<br>{r['strategy']}") for r in whatif],
                 unit="GB", title=f"Estimated memory of one training step, batch {WHATIF_BATCH}"
                                  " × 200 frames, Adam",
                 xaxis_title="model and activation strategy", limit=11,
                 limit_label="RTX 2080 Ti (11 GB)")

# %%
print(format_table(whatif, ["model", "strategy", "params", "peak_bytes", "peak_phase",
                            "activations", "gradients", "peak_ratio"]))

# %% [markdown]
# ## Exercises
#
# 1. **Invert by hand.** In section 1, replace G by `nn.Tanh()` and F by a `nn.Linear(2, 2)`
#    of your choice. Compute `inverse(y)` on paper first, then check.
# 2. **Low precision.** Run `study.reconstruction_error(dtypes=("float32",))` on a stage whose
#    activations are 100 times larger (scale the input). How does the error change, and why
#    (hint: the error of a subtraction is relative to the numbers subtracted)?
# 3. **Deep stages.** Call `study.full_size(models=["DF-ResNet233"], strategies=["checkpoint",
#    "reversible"])` (a few minutes). Which strategy wins now, and by how much? Relate the
#    difference to the 63 block inputs checkpointing stores in stage 3 (each 128 channels ×
#    20 × 50 × 4 bytes per utterance), and compare the reversible peak with DF-ResNet56's.
# 4. **Where is the peak?** Use `timeline_figure` on the reversible run of section 4 and find
#    the stage in which the peak happens. Why does making that stage reversible not help more?
# 5. **Accuracy.** In the dashboard, train `vanilla` and `reversible` for 150 steps with three
#    different seeds each (`lab.set(seed=...)`). Is the EER difference between the strategies
#    larger than the difference between seeds?
# 6. **Fully reversible.** Compare `reversible` and `reversible-full` in section 3 and section 6.
#    Where does the invertible downsampling save memory, and where does it not?
