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
# # 00 · Where the memory goes
#
# Training a network needs memory for more than its weights. On a GPU the sum of five kinds of
# tensors has to fit, or the step dies with *out of memory*:
#
# | category | what it is | bytes (fp32) | grows with |
# |---|---|---|---|
# | **parameters** | the weights (and BatchNorm buffers) | 4 per parameter | model size |
# | **gradients** | `.grad` of every weight, plus gradients of activations while backward runs | 4 per parameter (+ in flight) | model size |
# | **optimizer** | the optimizer's state: SGD momentum, Adam's two moments | SGD 4, Adam 8 per parameter | model size |
# | **activations** | what forward saves for backward, and its live intermediates | — | batch × frames × depth × width |
# | **other** | the input batch, library workspaces | — | batch × frames |
#
# In this notebook you will measure all five on a real speaker-verification model (a wespeaker
# style ResNet with an AAM-softmax head), watch how they grow with batch size and depth, train
# with the `MemoryLab` dashboard, and finally ask what a full-size model would need on a GPU,
# without having that GPU.
#
# **How to run:** *Run ▸ Run All Cells*. The whole notebook takes a few minutes on a laptop CPU;
# with the environment variable `MEMLAB_FAST=1` it uses tiny sizes and finishes in under a minute.

# %% [markdown]
# The next cell holds every size this notebook uses (it is tagged `parameters`, so tools such as
# papermill can override it). `FAST` picks tiny sizes for tests and CI.

# %% tags=["parameters"]
from memlab import fast_mode

FAST = fast_mode()                      # MEMLAB_FAST=1: tiny sizes (tests, CI)
BATCH = 8 if FAST else 16              # utterances per step (sections 1-3)
FRAMES = 100 if FAST else 200          # 10 ms fbank frames per utterance: 1 s / 2 s of speech
WIDTH = 8                              # base channels of the small ResNet
BATCH_SIZES = [2, 4, 8] if FAST else [4, 8, 16, 32]
DEPTHS = [1, 2, 3] if FAST else [1, 2, 3, 4]
LAB_STEPS = 6 if FAST else 60          # training steps per dashboard run
DF_RESNETS = ["DF-ResNet56"] if FAST else ["DF-ResNet56", "DF-ResNet110", "DF-ResNet233"]
WHATIF_BATCHES = [128] if FAST else [64, 128, 256]

# %%
import torch

from memlab.lab import Config, build_model, build_optimizer, estimate_config
from memlab.memory import CATEGORIES, MemoryMeter, format_bytes
from memlab.models.dfresnet import DEPTHS as DF_DEPTHS
from memlab.ui.figures import breakdown_figure, timeline_figure
from memlab.ui.measure import sweep
from memlab.widgets import MemoryLab

_ = torch.manual_seed(0)  # the same weights every run

# %% [markdown]
# ## 1. Measure one training step
#
# `Config` describes a run; `build_model` and `build_optimizer` make the same model and
# optimizer the lab trains. The input is a batch of `BATCH` utterances of `FRAMES` frames of
# 80-dim fbank features; random numbers are as good as speech for counting bytes.
#
# `MemoryMeter` watches every tensor that is allocated or freed inside the `with` block and
# files it under a category. **Look for:** where the peak happens (forward, backward or the
# optimizer step), and which category dominates it. Why is *optimizer* zero?

# %%
cfg = Config(task="speaker", width=WIDTH, depth=1, batch_size=BATCH)
model = build_model(cfg)                                   # ResNet + AAM-softmax head
opt = build_optimizer(cfg, model)                          # Adam
feats = torch.randn(BATCH, FRAMES, 80)                     # (B, T, F) fbank frames
labels = torch.randint(0, cfg.num_speakers, (BATCH,))      # (B,) speaker ids


def train_step():
    opt.zero_grad(set_to_none=True)
    loss, _logits = model(feats, labels)
    loss.backward()
    opt.step()


with MemoryMeter("cpu", model=model, optimizer=opt, inputs=(feats, labels)) as first:
    train_step()
print(first.summary())

# %% [markdown]
# Adam creates its state lazily, inside the first `opt.step()`, which runs *after* the peak
# (the start of backward, when every saved activation is still alive). From the second step on
# the state exists all the time, so it sits under the peak too.
#
# **Look for:** *optimizer* ≈ 2 × *parameters* (Adam keeps two fp32 numbers per weight),
# *parameters* ≈ 4 bytes × the parameter count, and activations many times larger than all the
# weight-sized categories together. The second column is each category's own maximum during the
# step. *gradients* reach theirs later in backward: the meter files the gradients of the
# activations being propagated under *gradients* too, and in a convolutional net those are far
# larger than the weights.

# %%
with MemoryMeter("cpu", model=model, optimizer=opt, inputs=(feats, labels)) as second:
    train_step()
n = sum(p.numel() for p in model.parameters())
print(second.summary())
print(f"\n{n:,} parameters x 4 bytes = {format_bytes(4 * n)}; Adam state 8 bytes each = "
      f"{format_bytes(8 * n)}\n")
print(f"{'category':12s} {'at the peak':>12s} {'own maximum':>12s}")
for c in CATEGORIES:
    print(f"{c:12s} {format_bytes(second.breakdown()[c]):>12s} "
          f"{format_bytes(second.category_peaks()[c]):>12s}")

# %% [markdown]
# The meter also keeps a timeline: the live bytes of each category after every allocation and
# free. **Look for:** activations piling up through forward, the peak where backward begins,
# activations being freed as backward walks back through the layers while gradients appear,
# and the small optimizer bump at the end.

# %%
timeline_figure(second, title="Live bytes through one training step (step 2)")

# %% [markdown]
# ## 2. How each category grows with batch size and depth
#
# `sweep` measures the steady-state step (step 2, optimizer state present) of one configuration
# for each value of one field. First the batch size. **Look for:** parameters, gradients and
# optimizer state stay flat; activations (and the input, *other*) grow in proportion to the
# batch. Memory that grows with the batch is the memory that limits the batch size.

# %%
base = Config(task="speaker", width=WIDTH, depth=1, batch_size=BATCH)
by_batch = sweep(base, "batch_size", BATCH_SIZES, frames=FRAMES)
breakdown_figure(by_batch, title="Memory vs batch size (ResNet, depth 1, Adam)",
                 xaxis_title="batch size (utterances)")

# %%
a, b = by_batch[0], by_batch[-1]
per_utt = (b["activations"] - a["activations"]) / (b["batch_size"] - a["batch_size"])
print(f"each extra utterance of {FRAMES} frames costs about {format_bytes(per_utt)} of "
      f"activations; the weights, gradients and Adam state together are "
      f"{format_bytes(a['parameters'] + a['gradients'] + a['optimizer'])}")

# %% [markdown]
# Now depth (`depth` = blocks per stage). **Look for:** every category grows, because deeper
# means more weights *and* more layers whose activations are saved. Activations grow by about
# the same amount for every block added: ordinary backpropagation keeps every block's
# activations until backward reaches it. The reversible networks of the later notebooks break
# exactly this line.

# %%
by_depth = sweep(base, "depth", DEPTHS, frames=FRAMES)
breakdown_figure(by_depth, title=f"Memory vs depth (ResNet, batch {BATCH}, Adam)",
                 xaxis_title="blocks per stage")

# %% [markdown]
# ## 3. Train it yourself: the MemoryLab dashboard
#
# The dashboard trains a real model on synthetic speech (speakers that differ in pitch, formants
# and timbre) in the background and plots, live:
#
# * **Memory at the peak**: one stacked bar per run, so runs compare side by side;
# * **Live bytes through one training step**: the timeline above, for the latest metered step;
# * **training loss** and the **evaluation** metric: accuracy on held-out utterances of the
#   training speakers and the equal error rate (EER, lower is better, 0.5 is chance) on speakers
#   never seen in training;
# * a table of runs.
#
# Move a slider (batch size, depth, width), pick strategies (the dropdowns list every
# technique registered in `memlab`), and press **Run**; **Stop** ends a run after the current
# step. Tick **fit into**, type a budget and press **Estimate** to learn, before running,
# whether the configuration fits.

# %%
lab = MemoryLab(task="speaker", width=WIDTH, batch_size=BATCH, steps=LAB_STEPS)
lab.show()

# %% [markdown]
# The next cell presses **Run** from code (the same as the button) and waits for the end, then
# trains once more at twice the batch size. **Look for:** the second bar is taller, and almost
# all of the difference is activations (red). The loss curves of the two runs differ a little:
# a bigger batch is a different optimisation problem.

# %%
records = lab.run(block=True)
records_2x = lab.run(block=True, batch_size=2 * BATCH)
for name, recs in (("batch", records), ("2x batch", records_2x)):
    peak = max(r.peak for r in recs if r.metered)
    print(f"{name:9s} {len(recs)} steps, peak {format_bytes(peak)}, final {recs[-1].metrics}")

# %% [markdown]
# ### A memory budget
#
# `check_budget` measures one step of the current configuration on *fake* tensors (shapes
# without data, so it costs no memory) and compares it with the budget. Here the budget is set
# to 80% of what the step needs, so the estimate says it will not fit, and the run stops at its
# first metered step with `MemoryBudgetExceeded`, the meter's stand-in for a CUDA out-of-memory
# error. **Look for:** the verdict next to the budget box, the dashed budget line in both
# memory plots, and the red *over budget* row in the table.

# %%
need = lab.check_budget()["peak"]
lab.set(budget=int(0.8 * need))
verdict = lab.check_budget()
print(f"estimated peak {format_bytes(verdict['peak'])}, budget {format_bytes(verdict['budget'])}: "
      f"{'fits' if verdict['fits'] else 'would not fit'}")
lab.run(block=True)
print("the run stopped with:", repr(lab.last_error))
lab.set(budget=None)

# %% [markdown]
# ## 4. What would a full-size model need?
#
# `estimate_config` runs a training step on fake tensors, so a configuration far too large for
# this machine costs nothing to measure. First the wespeaker ResNet34 (blocks (3, 4, 6, 3),
# width 32, 256-dim embedding) at batch 128 × 200 frames (2 s crops) with 5,994 training
# speakers (VoxCeleb2 dev), trained with Adam; two steps, so Adam's state is counted.
# **Look for:** how small the weight-sized categories are next to activations.

# %%
resnet34 = Config(task="speaker", blocks=(3, 4, 6, 3), width=32, embed_dim=256, batch_size=128)
est = estimate_config(resnet34, frames=200, num_classes=5994, steps=2)
print(est.summary())
print({c: f"{v / 1e9:.2f} GB" for c, v in est.breakdown().items()})

# %% [markdown]
# DF-ResNets (depth-first ResNets) reach a lower EER by stacking many cheap blocks in the third
# stage: DF-ResNet56 has (3, 3, 9, 3) blocks per stage, DF-ResNet233 (3, 8, 63, 3). Here they
# are at batch sizes around the usual 128 utterances of 200 frames. The dashed line is the
# 11 GB of a consumer RTX 2080 Ti. **Look for:** which bars cross it, and which category
# makes them cross.

# %%
rows = []
for name in DF_RESNETS:
    df = Config(task="speaker", model="dfresnet", blocks=DF_DEPTHS[name], width=32,
                embed_dim=256, batch_size=128)
    for r in sweep(df, "batch_size", WHATIF_BATCHES, frames=200, fake=True, num_classes=5994):
        rows.append(dict(r, label=f"{name}<br>B{r['batch_size']}"))
breakdown_figure(rows, unit="GB", title="Estimated training memory, 200 frames, Adam",
                 xaxis_title="model and batch size", limit=11, limit_label="RTX 2080 Ti (11 GB)")

# %% [markdown]
# ## Exercises
#
# 1. **Predict, then measure.** Double `FRAMES` in section 1. Which categories change, and by
#    what factor? Check with the meter.
# 2. **Optimizer state.** In the dashboard, train with `sgd`, `adam` and `adam8bit`. How many
#    bytes per parameter does each keep (compare the green *optimizer* segments with the blue
#    *parameters*)? Do the EER curves differ?
# 3. **Activations vs depth.** Set depth to 4 and run with activations `vanilla`, `checkpoint`
#    and `reversible`. Which bar segment shrinks, and what happens to the step time in the table?
# 4. **Your GPU.** With `estimate_config`, find the largest batch of ResNet34 (200 frames, Adam)
#    that fits into the memory of a GPU you know. How much larger can it be with
#    `memory="reversible"`?
# 5. **Why is *gradients* at the peak not the size of *parameters*?** Hint: look at the
#    timeline. When backward begins no parameter gradient exists yet (`zero_grad` set them to
#    `None`), but the gradients of the activations being propagated do.
# 6. **Speech recognition.** Switch the dashboard's task to `asr` and compare the `batched` and
#    `samplewise` transducer losses at a large batch. Which category does the sample-wise loss
#    save, and why does it grow with the vocabulary?
