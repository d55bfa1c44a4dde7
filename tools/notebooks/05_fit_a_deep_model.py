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
# # 05 · Fit a deep model: reversible blocks, 8-bit states, and both
#
# Liu & Qian (*Memory-Efficient Training for Deep Speaker Embedding Learning in Speaker
# Verification*, arXiv 2412.01195) train DF-ResNet233, a speaker net whose third stage has 63
# blocks, with **up to 16.2× less memory** and nearly the same EER, by combining two ideas:
# reversible blocks (activations are recomputed from outputs, notebook 01) and dynamic 8-bit
# block-wise optimizer states (notebook 02). This notebook tells that story on a model that
# trains on a laptop CPU: (1) where the memory of a deep speaker net goes; (2) reversible
# blocks; (3) 8-bit Adam; (4) both; (5) the same ratios at full size, estimated on fake
# tensors, beside the paper's 16.2×; (6) what the planner says makes DF-ResNet233 at batch 128
# fit into the 11 GB of an RTX 2080 Ti.
#
# Everything comes from `memlab.scenarios` ("everything": a DF-ResNet with a deep third stage,
# where activations dominate) and `memlab.planner`. **How to run:** *Run ▸ Run All Cells*;
# with `MEMLAB_FAST=1` tiny sizes finish in about a minute (read the figures from a full run).

# %% [markdown]
# The next cell holds every size this notebook uses (tagged `parameters`).

# %% tags=["parameters"]
from memlab import fast_mode

FAST = fast_mode()                      # MEMLAB_FAST=1: tiny sizes (tests, CI)
SCENARIO = "everything"                 # memlab.scenarios.names()
STEPS = 2 if FAST else 20               # training steps per run (memory needs few)
FIT = "11GiB"                           # the card of section 6 (RTX 2080 Ti: 11 GiB)
PLAN_KINDS = ("memory", "optimizer")    # kinds the planner varies (None: every kind)

# %%
import torch

from memlab import planner, scenarios
from memlab.lab import Experiment, peak_record
from memlab.memory import CATEGORIES, format_bytes
from memlab.report import format_table
from memlab.ui.figures import breakdown_figure

torch.manual_seed(0)
torch.set_num_threads(1)
s = scenarios.get(SCENARIO)
print(s.title, "\n", s.description)

# %% [markdown]
# ## 1. Where the memory of a deep speaker net goes
#
# One short run of each configuration of the scenario's comparison: vanilla and fully
# reversible blocks, each with Adam and with 8-bit Adam. **Look for:** in the vanilla/Adam row
# the *activations* column is almost the whole peak; parameters, gradients and the optimizer
# state are small beside it. That is the regime where reversible blocks pay.

# %%
cfgs = scenarios.configs(SCENARIO, steps=STEPS, measure_every=1, eval_every=10**6)
rows = []
for cfg in cfgs:
    exp = Experiment(cfg.replace(eval_at_start=False))
    for _ in exp.run():
        pass
    r = peak_record(exp.records, skip_first=True)
    rows.append({"run": cfg.label, "peak": r.peak, **r.breakdown})
print(format_table(rows, ["run", "peak", *CATEGORIES]))

# %% [markdown]
# The same rows as stacked bars, one colour per category. **Look for:** the orange
# *activations* block of the vanilla bars, and how little of it is left with reversible-full.

# %%
breakdown_figure([dict(r, label=f"{c.memory}<br>{c.optimizer}") for r, c in zip(rows, cfgs)],
                 title="Live: memory at the peak of a training step", unit="MiB",
                 xaxis_title="activations strategy / optimizer")

# %% [markdown]
# ## 2-4. Reversible blocks, 8-bit states, both
#
# The same rows as ratios to the baseline (vanilla/Adam): peak of the baseline ÷ peak of the
# run. **Look for:** reversible-full removes most of the peak (the activations); 8-bit Adam on
# its own changes little here, because the optimizer state is small at this scale — it matters
# once the activations are gone, and at full size, where the model has millions of parameters.

# %%
for row, ratio in zip(rows, scenarios.ratios(SCENARIO, rows, cfgs)):
    print(f"{row['run']:45s} {format_bytes(row['peak']):>12s}  {ratio:5.2f}x")

# %% [markdown]
# ## 5. At full size: DF-ResNet233, batch 128 × 200 frames, 5,994 speakers
#
# `scenarios.full_size` runs the same training step on fake tensors (no memory needed) for the
# scenario's full-size twin. **Look for:** the full-size saving of reversible-full + Adam8bit
# next to the paper's "up to 16.2×"; the live ratios above are smaller because a small model's
# fixed costs (the first stage's working set) weigh more. (In fast mode the twin is a tiny
# stand-in, so the figures mean nothing.)

# %%
base = scenarios.full_size(SCENARIO, {})
for cfg in cfgs:
    fs = scenarios.full_size(SCENARIO, {"memory": cfg.memory, "optimizer": cfg.optimizer})
    print(f"{cfg.memory:16s} {cfg.optimizer:9s} {format_bytes(fs['peak']):>12s}  "
          f"{base['peak'] / fs['peak']:5.1f}x   (peak in {fs['phase']})")
print(scenarios.headline(SCENARIO))

# %% [markdown]
# The full-size peaks as bars, with the 11 GB of an RTX 2080 Ti as a dashed line. **Look for:**
# which bars end below the line.

# %%
full_rows = []
for cfg in cfgs:
    fs = scenarios.full_size(SCENARIO, {"memory": cfg.memory, "optimizer": cfg.optimizer})
    full_rows.append({"label": f"{cfg.memory}<br>{cfg.optimizer}",
                      **{c: fs["breakdown"].get(c, 0) for c in CATEGORIES}})
breakdown_figure(full_rows, title="Full size (estimated on fake tensors): memory at the peak",
                 unit="GiB", xaxis_title="activations strategy / optimizer",
                 limit=11 * 10**9 / 2**30, limit_label="RTX 2080 Ti (11 GB)")

# %% [markdown]
# ## 6. What fits into 11 GB?
#
# `memlab plan` (here `planner.plan`) estimates the full-size twin under the registered
# combinations and lists those that fit, cheapest first by the benchmarks' measured step-time
# ratios. **Look for:** vanilla/Adam does not fit; which combinations do, and what they cost in
# step time. (`PLAN_KINDS = None` lets the planner also try precision, accumulation and the
# optimizer step in backward; it takes longer.)

# %%
twin = s.fast_twin if FAST else s.twin
from memlab.lab import Config  # noqa: E402

full_cfg = Config(task=s.task, **dict(twin.overrides))
result = planner.plan(full_cfg, FIT, frames=twin.frames, num_classes=twin.num_classes,
                      kinds=PLAN_KINDS, verify=4 if FAST else 8)
print(planner.format_plan(result))

# %% [markdown]
# ## 7. More than one GPU: memory per rank
#
# Data-parallel training splits the global batch across N ranks (`Config(parallel=..., nproc=N)`,
# `memlab compare --nproc N`). Under **DDP** every rank keeps a full copy of the parameters, the
# gradients and the optimizer state; under **FSDP2** each rank keeps its shard (1/N) of them and
# all-gathers one block's parameters at a time. Below, a small speaker net with Adam8bit trains 2
# steps on 2 local CPU ranks (gloo), each rank metering its own memory, beside the per-rank
# estimate on fake tensors (`estimate_config`: one rank's step at batch B/N, in a fake process
# group). **Look for:** parameters and optimizer halve per rank under FSDP2; the estimated peak
# lands within a few percent of each rank's measured one.

# %%
from memlab.lab import estimate_config  # noqa: E402
from memlab.parallel import measure_ranks  # noqa: E402

par_cfgs = [Config(task="speaker", parallel=mode, nproc=2, optimizer="adam8bit", batch_size=4,
                   width=16 if FAST else 32, seconds=0.5, sync_bn=True, num_speakers=6,
                   utts_per_speaker=4, eval_speakers=4) for mode in ("ddp", "fsdp2")]
measured = measure_ranks(par_cfgs, steps=2)          # 2 CPU ranks per config, one launch
rank_rows = []
for pcfg, ranks in zip(par_cfgs, measured):
    est = estimate_config(pcfg, steps=2)
    for r in ranks:
        rank_rows.append({"label": f"{pcfg.parallel}<br>rank {r['rank']}<br>measured",
                          **r["breakdown"]})
    rank_rows.append({"label": f"{pcfg.parallel}<br>per rank<br>estimated", **est.breakdown()})
    top = max(r["peak"] for r in ranks)
    print(f"{pcfg.parallel:6s} measured per rank: "
          f"{' / '.join(format_bytes(r['peak']) for r in ranks)}; estimated "
          f"{format_bytes(est.peak)} ({100 * (est.peak / top - 1):+.1f}%); parameters "
          f"{format_bytes(est.breakdown()['parameters'])}, optimizer "
          f"{format_bytes(est.breakdown()['optimizer'])} per rank")

# %% [markdown]
# The same figures as bars, one per rank and one for the estimate, in MiB. **Look for:** the
# blue *parameters* and the *optimizer* blocks of the FSDP2 bars, half those of DDP; at this
# tiny size FSDP2's all-gathered block parameters and unsharded gradients can outweigh what
# sharding saves — the saving grows with the model, the activations with the batch per rank.

# %%
breakdown_figure(rank_rows, title="Memory per rank at the peak: 2 CPU ranks (gloo) and the "
                 "estimate", unit="MiB", xaxis_title="mode / rank")

# %% [markdown]
# ## Exercises
#
# 1. Run `scenarios.configs("deep-speaker")` instead: where does checkpointing land between
#    vanilla and reversible, live and at full size? Why does it still grow with depth?
# 2. Change the twin's batch size (`Config(..., batch_size=64)`) and re-plan for 11 GiB: which
#    combinations fit now, and which is the cheapest?
# 3. Set `PLAN_KINDS = None`: does `accumulate4` or `bf16` make vanilla fit? What do they cost
#    that the table cannot tell you (see "not measured")?
# 4. In section 1, switch to `optimizer="sgd8bit"` (`scenarios.configs(SCENARIO,
#    {"optimizer": "sgd,sgd8bit"})`): how much does momentum's state weigh against Adam's?
# 5. In section 7, plan for 4 GPUs: `planner.plan(full_cfg.replace(parallel="fsdp2",
#    nproc=4), FIT, ...)` (the batch must divide by 4). What fits into 11 GiB per rank now?
