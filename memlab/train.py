"""One configuration, data-parallel: ``torchrun --nproc-per-node N -m memlab.train ...``.

    torchrun --nproc-per-node 2 -m memlab.train --task speaker --optimizer adam8bit
    torchrun --nproc-per-node 8 -m memlab.train --task asr --loss samplewise --parallel fsdp2 \\
        --device cuda --batch-size 64
    python -m memlab.train --nproc 2 --task speaker      # without torchrun: starts 2 local ranks

The flags are those of ``memlab compare`` (``memlab compare --help``) for exactly one
combination of techniques. Under torchrun the world size is torchrun's (``--nproc``, if given,
must agree); the mode defaults to ``ddp``. Rank 0 prints the table (or ``--json``); every rank
meters its own memory and the table lists each rank's peak (``rank_peaks``).
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

from memlab import cli, parallel
from memlab import techniques as tech

PROG = "python -m memlab.train"


def _parser():
    p = cli.build_parser()
    sub = next(a for a in p._subparsers._group_actions if a.dest == "command")
    c = sub.choices["compare"]
    c.prog = PROG
    c.description = (__doc__ or "").strip().splitlines()[0]
    return c


def run(args) -> int:
    from memlab.lab import Config  # noqa: F401  (the Config fields named below)
    torchrun = "WORLD_SIZE" in os.environ and "RANK" in os.environ
    overrides = {}
    for name in ("steps", "batch_size", "depth", "width", "seed", "device", "model", "lr",
                 "eval_every", "nproc", "parallel", "sync_bn"):
        v = getattr(args, name)
        if v is not None:
            overrides[name] = v
    if torchrun:
        world = int(os.environ["WORLD_SIZE"])
        if overrides.get("nproc", world) != world:
            raise ValueError(f"nproc: --nproc {overrides['nproc']} but torchrun started "
                             f"{world} ranks")
        overrides["nproc"] = world
        overrides.setdefault("parallel", "ddp")
    elif overrides.get("nproc", 1) > 1:
        overrides.setdefault("parallel", "ddp")
    choices = {kind: getattr(args, cli._kind_option(kind)) for kind in tech.kinds()}
    if getattr(args, "scenario", None) is not None:
        raise ValueError("scenario: memlab.train runs one configuration; use memlab compare "
                         "--scenario")
    args.task = args.task or "speaker"
    cfgs = cli.compare_configs(args.task, overrides, choices=choices)
    if len(cfgs) != 1:
        raise ValueError(f"memlab.train runs one configuration, got {len(cfgs)} combinations "
                         f"({', '.join(c.label for c in cfgs)}); use memlab compare")
    cfg = cfgs[0]
    if torchrun:
        parallel.init_from_env(cfg.device)
    rank = parallel.rank_world()[0]
    if not args.force and rank == 0 and not torchrun:
        cli.check_memory(cfgs)
    try:
        row = cli._run_one(cfg, 0, 1, progress=not args.json and rank == 0)
    finally:
        if torchrun and parallel.in_group():
            parallel.dist.destroy_process_group()
    if rank == 0:
        cli._print_rows([row], args.task, args.json)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError) as e:
        if os.environ.get("MEMLAB_DEBUG", "") not in ("", "0"):
            raise
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
