"""Bookkeeping of the 8-bit optimizers (:mod:`memlab.optim`): argument checks, the checks of a
loaded ``state_dict``, and the checkpoint form of states of DTensor (FSDP2) parameters.

Sharded parameters (DTensor, ``torch.distributed.fsdp.fully_shard``): ``optimizer.state`` holds
plain tensors of the *local* shard only (codes: one uint8 per local element, absmax: one float32
per block of the *global* tensor that the local shard touches, so a shard starting inside a block
has ``phase = start % block_size`` and shares that block's value with its neighbour, see
:mod:`memlab._shard_edges`). ``state_dict()`` gives them in a form that does not depend on the
sharding -- the form a single process holds -- so that ``torch.distributed.checkpoint`` can save
on N ranks and load on M:

* ``<name>_codes``: a uint8 DTensor laid out like the parameter (global shape, same placements);
  DCP saves and reshards it element-wise like the parameter itself.
* ``<name>_absmax``: the parameter's global absmax, (ceil(numel / block_size),) float32, the same
  on every rank (a plain tensor, saved once), all-gathered from the shards at ``state_dict()``
  (a collective: call it on every rank, as DCP does); on loading each rank takes the blocks its
  shard touches. Any shard sizes: the blocks are the global tensor's, as in one process.
* fp32 states (parameters under ``min_8bit_size``, decided on the global numel): DTensors laid
  out like the parameter, as torch.optim's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from memlab.distributed import (as_dtensor_like, flat_shard, gather_rows, is_dtensor, local,
                                shard_group)
from memlab.quant import QTensor, _blocks, num_blocks

def check_grad(opt, p: Tensor) -> None:
    """A parameter's gradient an optimizer can use: dense, of the parameter's shape and device
    (checked before a step changes anything)."""
    if p.grad.is_sparse:
        raise TypeError(f"{type(opt).__name__} does not support sparse gradients")
    if p.grad.shape != p.shape or p.grad.device != p.device:
        raise ValueError(f"grad of a parameter of shape {tuple(p.shape)} on {p.device} has "
                         f"shape {tuple(p.grad.shape)} on {p.grad.device}")


def _compile_errors() -> tuple:
    """Exception types torch.compile raises while tracing / compiling (not while running)."""
    from torch._dynamo import exc
    names = ("TorchDynamoException", "FailOnRecompileLimitHit", "TritonUnavailableError")
    return tuple(getattr(exc, n) for n in names if hasattr(exc, n))


def _check(name: str, value, ok: bool, expected: str):
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_common(group: dict) -> None:
    _check("lr", group["lr"], _is_number(group["lr"]) and group["lr"] >= 0, "a float >= 0")
    wd = group["weight_decay"]
    _check("weight_decay", wd, _is_number(wd) and wd >= 0, "a float >= 0")
    m8 = group["min_8bit_size"]
    _check("min_8bit_size", m8, isinstance(m8, int) and not isinstance(m8, bool) and m8 >= 0,
           "an int >= 0")
    bs = group["block_size"]
    _check("block_size", bs, isinstance(bs, int) and not isinstance(bs, bool) and bs > 0,
           "a positive int")
    _check("maximize", group["maximize"], isinstance(group["maximize"], bool), "a bool")


def _describe(t) -> str:
    if isinstance(t, Tensor):
        return f"{str(t.dtype)[6:]} with {t.numel()} elements of shape {tuple(t.shape)}"
    return f"{type(t).__name__} {t!r}"[:120]


def _own(t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device``, contiguous, with a storage of its own of exactly its size (a view
    of a bigger storage, or a stride-0 expand, is copied)."""
    t = t.to(device=device)
    if not (t.is_contiguous() and t.storage_offset() == 0
            and t.untyped_storage().nbytes() == t.numel() * t.element_size()):
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def _checked_step(s, where: str) -> int:
    """A saved step counter: an int >= 0 or a 0-dim real tensor holding one."""
    val = None
    if isinstance(s, Tensor):
        if s.dim() == 0 and not s.is_complex() and s.dtype != torch.bool:
            val = s.item()
    elif isinstance(s, int) and not isinstance(s, bool):
        val = s
    if val is None or not math.isfinite(val) or val < 0 or val != int(val):
        raise ValueError(f"{where}: state 'step' must be an int >= 0 (or a 0-dim tensor holding "
                         f"one), got {_describe(s)}")
    return int(val)


def _budget_meter():
    """The innermost active ``memlab.memory.MemoryMeter`` with a budget, or None (found on
    torch's dispatch-mode stack; no import of memlab.memory unless one is active)."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
    for mode in reversed(_get_current_dispatch_mode_stack()):
        meter = getattr(mode, "meter", None)
        if (type(mode).__module__ == "memlab.memory" and meter is not None
                and getattr(meter, "budget", None) is not None):
            return meter
    return None


def _copy_state(s: State) -> State:
    if isinstance(s, QTensor):
        return QTensor(s.codes.clone(), s.absmax.clone(), s.shape, s.signed, s.block_size,
                       s.phase)
    return s.clone()


def _tensors(s: State) -> tuple:
    return (s.codes, s.absmax) if isinstance(s, QTensor) else (s,)


def _is_fake(t: Tensor) -> bool:
    try:
        from torch._subclasses.fake_tensor import is_fake
    except ImportError:  # pragma: no cover
        return False
    return is_fake(t)


# ----------------------------------------------------------------------------------------------
# loading a state_dict: everything checked before anything changes


def checked_states(opt, state_dict, validate_group=None, param_state=None) -> dict:
    """{param: its new state} from ``state_dict``, every check done; raises ValueError.

    ``validate_group(group)`` checks a saved group's hyper-parameters (default: the 8-bit
    optimizers' ``_check_common`` + ``opt._validate``); ``param_state(st, p, group, where)``
    checks and copies one parameter's state (default: :func:`checked_param_state`)."""
    name = type(opt).__name__
    if validate_group is None:
        def validate_group(merged):
            _check_common(merged)
            opt._validate(merged)
    if param_state is None:
        def param_state(st, p, group, where):
            return checked_param_state(opt, st, p, group, where)
    if not (isinstance(state_dict, Mapping) and "state" in state_dict
            and "param_groups" in state_dict):
        raise ValueError(f"state_dict must be a mapping with 'state' and 'param_groups' (from "
                         f"{name}.state_dict()), got {type(state_dict).__name__}")
    saved, groups = state_dict["state"], state_dict["param_groups"]
    if not isinstance(saved, Mapping) or not isinstance(groups, (list, tuple)):
        raise ValueError("state_dict: 'state' must be a mapping and 'param_groups' a list, "
                         f"got {type(saved).__name__} and {type(groups).__name__}")
    if len(groups) != len(opt.param_groups):
        raise ValueError(f"state_dict has {len(groups)} param groups, this {name} has "
                         f"{len(opt.param_groups)}")
    id_map = {}
    for gi, (sg, g) in enumerate(zip(groups, opt.param_groups)):
        if not isinstance(sg, Mapping) or not isinstance(sg.get("params"), (list, tuple)):
            raise ValueError(f"state_dict: param_groups[{gi}] must be a dict with a 'params' "
                             f"list, got {sg!r}"[:300])
        missing = sorted(k for k in opt.defaults if k not in sg)
        if missing:
            art = "an" if name[0] in "AEIOU" else "a"
            raise ValueError(
                f"state_dict is not {art} {name} state: param_groups[{gi}] lacks "
                f"{', '.join(missing)} (a torch.optim state_dict has none of these settings; "
                f"load it into the optimizer that saved it)")
        if len(sg["params"]) != len(g["params"]):
            raise ValueError(f"state_dict: param_groups[{gi}] has {len(sg['params'])} params, "
                             f"this {name} has {len(g['params'])} there")
        merged = {**sg, "params": g["params"]}
        try:
            validate_group(merged)
        except (ValueError, TypeError) as e:
            raise ValueError(f"state_dict: param_groups[{gi}]: {e}") from None
        for pi, (k, p) in enumerate(zip(sg["params"], g["params"])):
            id_map[k] = (gi, pi, p, merged)
    out = {}
    for k, st in saved.items():
        if k not in id_map:
            raise ValueError(f"state_dict: 'state' has an entry for parameter id {k!r}, "
                             f"which no param group lists")
        gi, pi, p, group = id_map[k]
        where = f"state_dict: param_groups[{gi}] param {pi} (shape {tuple(p.shape)})"
        if not isinstance(st, Mapping):
            raise ValueError(f"{where}: state must be a dict, got {type(st).__name__}")
        out[p] = param_state(st, p, group, where)
    return out

def checked_param_state(opt, st: Mapping, p: Tensor, group: dict, where: str) -> dict:
    if not st:
        return {}
    if "step" not in st:
        raise ValueError(f"{where}: state has no 'step' (keys: {sorted(map(str, st))})")
    step = _checked_step(st["step"], where)
    n, bs = p.numel(), group["block_size"]          # global sizes (a DTensor's numel is global)
    nb = -(-n // bs)
    for name, _ in opt._state_specs(group):
        if name in st:
            t = st[name]
            if not (isinstance(t, Tensor) and t.dtype == torch.float32
                    and t.shape == p.shape):
                raise ValueError(f"{where}: state '{name}' must be a float32 tensor of shape "
                                 f"{tuple(p.shape)}, got {_describe(t)}")
        elif name + "_codes" in st or name + "_absmax" in st:
            codes, absmax = st.get(name + "_codes"), st.get(name + "_absmax")
            for key, t, dtype, count in ((name + "_codes", codes, torch.uint8, n),
                                         (name + "_absmax", absmax, torch.float32, nb)):
                if t is None:
                    raise ValueError(f"{where}: state has '{name}_codes' or '{name}_absmax' "
                                     f"but not both (no '{key}')")
                if not (isinstance(t, Tensor) and t.dtype == dtype and t.numel() == count):
                    extra = f" (block_size={bs})" if key.endswith("_absmax") else ""
                    raise ValueError(f"{where}: state '{key}' must be {str(dtype)[6:]} with "
                                     f"{count} elements{extra}, got {_describe(t)}")
        else:
            raise ValueError(f"{where}: state lacks '{name}' (fp32) or '{name}_codes' + "
                             f"'{name}_absmax' (8-bit); it has {sorted(map(str, st))}")
    absmax_keys = {name + "_absmax" for name, _ in opt._state_specs(group)}
    new = {k: (_own(_to_local(v, p, bs, k in absmax_keys, where), local(p).device)
               if isinstance(v, Tensor) else v) for k, v in st.items()}
    for name, _ in opt._state_specs(group):
        if name + "_codes" in new:
            new[name + "_codes"] = new[name + "_codes"].view(-1)
            new[name + "_absmax"] = new[name + "_absmax"].view(-1)
    new["step"] = step
    return new



# ----------------------------------------------------------------------------------------------
# DTensor parameters: local states <-> checkpoint form


def _to_local(v: Tensor, p: Tensor, bs: int, is_absmax: bool, where: str) -> Tensor:
    """A checked state tensor (global form) as this rank's part for parameter ``p``."""
    if not is_dtensor(p):
        return v.full_tensor() if is_dtensor(v) else v
    if is_dtensor(v) and not is_absmax and v.device_mesh == p.device_mesh \
            and tuple(v.placements) == tuple(p.placements) and v.shape == p.shape:
        return v.to_local()                        # DCP filled the template: already our shard
    full = v.full_tensor() if is_dtensor(v) else v
    seg = flat_shard(p)
    if is_absmax:
        if seg is None:
            raise ValueError(f"{where}: 8-bit states of a parameter with placements "
                             f"{p.placements} have no checkpoint form (only Shard(0) / Replicate)")
        first = seg[0] // bs                   # the global blocks this rank's shard touches
        return full.reshape(-1)[first:first + _blocks(seg[1], bs, seg[0] % bs)]
    from memlab.distributed import _local_offset
    shape, offset = _local_offset(p)
    index = tuple(slice(o, o + s) for o, s in zip(offset, shape))
    return full.reshape(p.shape)[index]


def global_absmax(absmax: Tensor, p: Tensor, bs: int, where: str) -> Tensor:
    """The parameter's global absmax from every shard's local one (all-gather over the ranks
    that split ``p``): each rank holds the values of the global blocks its shard touches (a
    block shared by two ranks holds the same value on both, ``memlab._shard_edges``)."""
    group = shard_group(p)
    seg = flat_shard(p)
    if group is None:
        return absmax
    if seg is None:
        raise ValueError(f"{where}: 8-bit states of a parameter with placements {p.placements} "
                         f"have no checkpoint form (only Shard(0) / Replicate)")
    parts = gather_rows(absmax, seg, group)            # [([start, numel], absmax)] per rank
    out = torch.zeros(num_blocks(p.numel(), bs), dtype=absmax.dtype, device=absmax.device)
    for (start, n), t in parts:
        if n:
            out[start // bs:start // bs + t.numel()] = t
    return out


def to_checkpoint(opt, st: dict, p: Tensor, group: dict, where: str) -> dict:
    """The checkpoint form of the state ``st`` of DTensor parameter ``p`` (see module doc)."""
    out = dict(st)
    for name, _ in opt._state_specs(group):
        if name in st:
            out[name] = as_dtensor_like(st[name], p)
        elif name + "_codes" in st:
            out[name + "_codes"] = as_dtensor_like(st[name + "_codes"], p)
            out[name + "_absmax"] = global_absmax(st[name + "_absmax"], p, group["block_size"],
                                                  where)
    return out
