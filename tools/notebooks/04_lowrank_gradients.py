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
# # 04 · Low-rank gradients: personalizing an ASR model with less memory
#
# Personalization adapts a trained speech recognizer to one user's voice, ideally on their own
# device, where memory is scarce. With Adam, every weight matrix W (m × n) brings three more
# matrices of the same size into training: its gradient and Adam's two moments. Gooneratne et
# al. (*Low-rank Gradient Approximation for Memory-Efficient On-device Training of Deep Neural
# Network*, ICASSP 2020, arXiv 2001.08885) train each matrix through a low-rank update instead:
#
# $$W_\text{eff} = W + A B, \qquad A \in \mathbb{R}^{m \times r} \text{ (zeros at the start)},
# \quad B \in \mathbb{R}^{r \times n}$$
#
# W is frozen; only A and B get gradients and Adam state, r (m + n) numbers instead of m n.
# Every `merge_every` steps A B is folded into W and the factors restart, so over time the
# update is not limited to rank r. They report **−33 % training memory** against Adam and a
# 4.5 % relative lower WER than SGD with momentum, which needs about as much memory.
#
# `memlab.lowrank.LowRankAdam` implements it. This notebook asks three questions:
#
# 1. Is a low-rank gradient a good approximation? (the singular values of real gradients)
# 2. How much memory does it save per matrix, and does the meter agree with the arithmetic?
# 3. Does it hold up in a real personalization run: memory *and* accuracy against Adam and
#    momentum?

# %% [markdown]
# The next cell holds every size this notebook uses (tagged `parameters`). `FAST` picks tiny
# sizes for tests and CI: the models are then too small and too briefly trained for the numbers
# to mean much, so read the figures from a full run.

# %% tags=["parameters"]
from memlab import fast_mode

FAST = fast_mode()                      # MEMLAB_FAST=1: tiny sizes (tests, CI)
SPECTRUM_BATCH = 4 if FAST else 16      # utterances in the backward pass of section 1
M, N = (256, 512) if FAST else (1024, 1024)   # the weight matrix of section 2
RANKS = [1, 4, 16, 64] if FAST else [1, 2, 4, 8, 16, 32, 64, 128, 256]
STUDY_RANKS = (1, 4, 16)                # LowRankAdam ranks in the personalization study
# unseen speakers adapted to in section 3 (None: study.SPEAKERS_FAST, two, in fast mode)
STUDY_SPEAKERS = None if FAST else tuple(range(1000, 1008))
LAB_STEPS = 4 if FAST else 100          # adaptation steps per dashboard run

# %%
import torch
import plotly.graph_objects as go

from memlab.bench import lowrank as study
from memlab.memory import format_bytes
from memlab.report import format_table, run_summary
from memlab.ui.figures import breakdown_figure, reference_line
from memlab.widgets import MemoryLab

torch.manual_seed(0)

# %% [markdown]
# ## 0. The model and the speakers
#
# The model is memlab's small Transducer (conv front end, Transformer encoder of width 256,
# LSTM predictor, joiner). `study.pretrained()` trains it on 8 synthetic speakers the first time
# (about two minutes on a laptop CPU, seconds in fast mode) and keeps the state dict in a cache
# folder, so later calls, the study and the dashboard all start from the same model.
# **Look for:** the token error rate (TER) on held-out utterances of the training speakers; the
# unseen speaker we adapt to will start worse than that.

# %%
path, info = study.pretrained(FAST)
print(f"pretrained model: {path}")
print(f"TER on held-out utterances of the training speakers: {info['ter']:.3f} "
      f"({info['steps']} steps, {info['seconds']:.0f} s when it was trained)")

# %% [markdown]
# ## 1. Why low rank is enough: the spectrum of real gradients
#
# One backward pass of the pretrained model on utterances of the unseen speaker, then the
# singular values σ₁ ≥ σ₂ ≥ … of the gradient of every weight matrix (conv kernels viewed as
# out × in·k). If the first few carry almost all of the gradient's energy (Σσᵢ²), a rank-r
# update loses little. **Look for:** how fast the curves fall (both axes are logarithmic; a
# curve stops where it reaches 10⁻⁷, float32's round-off, below which σᵢ is noise). The
# table gives the rank that holds 90 % of the energy and the share of the top 1 / 4 / 16
# directions: for most matrices a handful of directions hold 90 % or more. Which matrices are
# the least low-rank? (In the full-size run: the LSTM predictor's two matrices.)

# %%
spectra = study.gradient_spectra(FAST, batch_size=SPECTRUM_BATCH)
SV_FLOOR = 1e-7                                   # float32 round-off, relative to σ₁
fig = go.Figure()
for row in spectra:
    sv = [s for s in row["sv"] if s >= SV_FLOOR]              # the rest is round-off
    fig.add_scatter(x=list(range(1, len(sv) + 1)), y=sv, mode="lines",
                    name=f"{row['name']} {row['shape'][0]}×{row['shape'][1]}")
fig.update_layout(template="plotly_white", height=420,
                  title="Singular values of the gradient of each weight matrix (σᵢ / σ₁)",
                  xaxis=dict(title="index i of the singular value (log scale)", type="log"),
                  yaxis=dict(title="σᵢ / σ₁ (relative singular value, log scale)", type="log",
                             exponentformat="power"),
                  legend=dict(font=dict(size=10)))
fig

# %%
print(format_table([{"matrix": r["name"], "shape": "x".join(map(str, r["shape"])),
                     "rank for 90% energy": r["energy_rank_90"],
                     "energy top-1": r["energy_at"][1], "top-4": r["energy_at"][4],
                     "top-16": r["energy_at"][16]} for r in spectra]))

# %% [markdown]
# ## 2. Memory against rank, for one weight matrix
#
# For an m × n matrix, Adam keeps the gradient and two moments: 3 m n fp32 numbers.
# `LowRankAdam` keeps the same three for A (m × r) and B (r × n): 3 r (m + n). The ratio is
# r (m + n) / (m n). `study.memory_vs_rank` measures it with the `MemoryMeter` (the gradients
# and optimizer state alive at the end of a step) for an `M × N` `nn.Linear`. **Look for:** the
# measured points on the predicted line, and the rank where low rank stops paying:
# r = m n / (m + n), half the width of a square matrix.

# %%
mem = study.memory_vs_rank(M, N, ranks=RANKS)
adam_bytes = mem[0]["measured_bytes"]
lr_rows = [r for r in mem if r["method"] == "lowrank-adam"]
fig = go.Figure()
fig.add_scatter(x=[r["rank"] for r in lr_rows], y=[r["predicted_bytes"] / 2**20 for r in lr_rows],
                mode="lines", name="predicted 4 B × 3 r (m + n)", line=dict(dash="dash"))
fig.add_scatter(x=[r["rank"] for r in lr_rows], y=[r["measured_bytes"] / 2**20 for r in lr_rows],
                mode="markers", name="measured (MemoryMeter)", marker=dict(size=9))
fig.update_layout(template="plotly_white", height=400,
                  title=f"Gradient + Adam state of one {M}×{N} weight matrix",
                  xaxis=dict(title="rank r (log scale)", type="log", tickvals=RANKS),
                  yaxis=dict(title="gradients + optimizer state (MiB, log scale)", type="log"))
reference_line(fig, adam_bytes / 2**20,                # after type="log": label at log10(y)
               f"Adam: gradient + 2 moments = {format_bytes(adam_bytes)}", color="#c62828")
fig

# %%
print(format_table(mem, ["method", "rank", "measured_bytes", "predicted_bytes", "ratio",
                         "predicted_ratio"]))

# %% [markdown]
# ## 3. The personalization study
#
# `study.run()` adapts the pretrained model to each unseen synthetic speaker in
# `STUDY_SPEAKERS` (eight here, about 4 minutes; two in fast mode; `memlab bench lowrank` runs all
# sixteen of `study.SPEAKERS`) with SGD + momentum, Adam and `LowRankAdam` at ranks
# `STUDY_RANKS`: for every speaker the same 100 steps of batch 2 from 60 of the speaker's
# utterances, each method at its own learning rate (chosen by a sweep on the speakers'
# adaptation training splits only, see `study.LRS` and `study.sweep_lr`). Memory is metered
# over a whole adaptation step in the steady state; TER is measured on 100 held-out utterances
# of each speaker before and after. **Look for:** the total (`peak_bytes`) of low rank against
# Adam's (`peak_vs_adam`) and against momentum's; where the saving comes from in the breakdown;
# and whether `ter_after` keeps up with the full-rank methods.

# %%
rows = study.run(fast=FAST, ranks=STUDY_RANKS, speakers=STUDY_SPEAKERS)
print(format_table(rows, ["method", "rank", "lr", "peak_bytes", "peak_vs_adam", "parameters",
                          "gradients", "optimizer", "activations", "other", "grad_opt_bytes",
                          "ter_before", "ter_after"]))

# %% [markdown]
# The same numbers as bars (one colour per category, as in every memlab figure). **Look for:**
# the green optimizer segment, which is two weight-sized copies for Adam, one for momentum,
# and a sliver for low rank; the orange gradients, which shrink the same way. The red
# activations are *larger* in the low-rank bar because its peak moved: Adam and momentum peak
# in the optimizer step (all gradients and the state alive, activations already freed), low
# rank at the start of backward, when the activations are still alive (including W + A B, which
# the LSTM and the attention's `in_proj_weight` and output projection keep for backward: they
# use `attach="parametrize"`). What is left of its optimizer state is the factors' moments plus
# Adam on the biases, norms, the embedding and two small matrices below `min_size` (exercise 4).

# %%
breakdown_figure([dict(r, label=r["method"] + (f" r={r['rank']}" if r["rank"] else ""))
                  for r in rows], title="Training memory of one adaptation step",
                 xaxis_title="optimizer")

# %% [markdown]
# Is a difference in TER real? Speakers differ far more from each other (`ter_after_std`) than
# the optimizers do, so compare each method with momentum *speaker by speaker*: `vs_momentum` is
# the mean of the paired differences (negative: better than momentum), `vs_momentum_se` its
# standard error, `wins_vs_momentum` counts speakers better / equal / worse. **Look for:**
# differences smaller than about two standard errors, which one more speaker could flip.

# %%
print(format_table(rows, ["method", "rank", "ter_after", "ter_after_std", "vs_momentum",
                          "vs_momentum_se", "wins_vs_momentum", "ter_per_speaker"]))

# %% [markdown]
# The acceptance criteria of the study, row by row: at least 30 % below Adam, the peak relative
# to momentum's, and TER after adaptation no worse than momentum's (`ter_ok`: the mean is no
# higher; `ter_ok_within_noise`: the paired difference is at most two standard errors above 0).

# %%
print(format_table(study.check(rows)))

# %% [markdown]
# ## 4. Personalize live in the dashboard
#
# `study.personalization_config(method, rank)` is the lab preset: the pretrained model
# (`Config.init_from`), the unseen speaker's utterances (`Config.adapt_speaker`), and the study's
# batch size, steps and learning rate for `method`. `study.lab_overrides` turns it into
# `MemoryLab` arguments. The TER curve starts at step 0, before adaptation.
#
# The dashboard has no learning-rate control, and `optimizer_kwargs` go to whichever optimizer
# is selected, so switch optimizers from code as below (`lr=` and `optimizer_kwargs=` beside
# `optimizer=`). Picking `lowrank-adam` in the dropdown uses rank 4, `LowRankAdam`'s default,
# and one lr for everything; the runs below use `study.RANK` (16), the smallest rank of the
# study that keeps up with momentum on this model. The study gives the factors
# `study.LRS["lowrank-adam"]` and the tensors that stay plain Adam (biases, norms, embedding)
# `study.OTHER_LR` (`other_lr=`), Adam's own lr: a rank-r step moves each matrix in r
# directions only and tolerates a larger lr than a full-size Adam step.

# %%
preset = study.personalization_config("sgd", fast=FAST, steps=LAB_STEPS)
lab = MemoryLab(**study.lab_overrides(preset))
lab.show()

# %% [markdown]
# The next cell trains the three optimizers one after another (the same as pressing **Run**)
# and waits for each. **Look for:** in *memory at the peak*, the low-rank bar far below Adam's
# and a little below momentum's; in the curves, the TER of all three falling from the same
# starting point.

# %%
runs = {}
runs[f"lowrank-adam r={study.RANK}"] = lab.run(
    block=True, optimizer="lowrank-adam", lr=study.LRS["lowrank-adam"],
    optimizer_kwargs={"rank": study.RANK, "other_lr": study.OTHER_LR})
runs["adam"] = lab.run(block=True, optimizer="adam", optimizer_kwargs={}, lr=study.LRS["adam"])
runs["momentum"] = lab.run(block=True, optimizer="sgd", optimizer_kwargs={},
                           lr=study.LRS["sgd"])
for name, recs in runs.items():
    print(run_summary(name, recs))

# %% [markdown]
# ## Exercises
#
# 1. **Where does the saving stop?** Add rank 64 and 128 to `STUDY_RANKS`. At which rank is
#    `LowRankAdam` no better than momentum in memory? Compare with section 2's break-even rank.
# 2. **Batch size.** Run `study.run(batch_size=16)`. Why does the saving against Adam shrink?
#    (Look at which category grows.) When is low-rank training worth it?
# 3. **Merging.** `merge_every` folds A B into W and restarts the factors. Try
#    `study.run(merge_every=10)` and `merge_every=1000` (never within 100 steps). Does the TER
#    after adaptation change? Why might a rank-1 update still reach a full-rank change?
# 4. **What is left at full size?** Build `LowRankAdam(model, rank=4)` on a fresh
#    `build_model(preset)` (from `memlab.lab`) and list `opt.targets()`: every weight matrix,
#    including the attention's packed `in_proj_weight` (a bare `nn.Parameter`, wrapped with
#    `torch.nn.utils.parametrize`). Which parameters are left in `opt.param_groups[1]` (plain
#    Adam), and how many bytes of optimizer state do they cost? What does `min_size=0` change?
# 5. **GaLore.** `LowRankAdam(model, proj="svd")` keeps the full gradient but projects Adam's
#    moments on the top-r singular vectors of the gradient (Zhao et al. 2024). Predict its
#    gradients + optimizer bytes for an m × n matrix, then measure as in section 2.
# 6. **New speakers.** The learning rates were chosen on the training splits of speakers
#    1000-1007. Run `study.run(speakers=range(1008, 1016))`: speakers never used for any
#    choice. Does the ranking of the optimizers hold? How do the standard errors change when
#    you pool all sixteen?
