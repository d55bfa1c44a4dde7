"""Property-based tests: random shapes, dtypes, lengths and values thrown at the public functions
of quant, transducer, reversible, optim and the data readers. The only acceptable outcomes are a
result or a ValueError/TypeError whose message names an argument (or, for files, the file).

Derandomized (the same examples every run) and sized to run in seconds.
"""

import math
import os
import struct

import pytest
import torch
from torch import nn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import example, given, settings, strategies as st  # noqa: E402

from memlab.optim import Adam8bit, AdamW8bit, SGD8bit  # noqa: E402
from memlab.quant import (QTensor, dequantize_blockwise, dynamic_map, linear_map,  # noqa: E402
                          quantize_blockwise)
from memlab.reversible import AdditiveCoupling, ReversibleSequence  # noqa: E402
from memlab.transducer import (rnnt_loss_batched, rnnt_loss_reference,  # noqa: E402
                               samplewise_rnnt_loss)

# MEMLAB_HYPOTHESIS_EXAMPLES=1000 for a longer hunt; CI runs the derandomized 60
SETTINGS = settings(max_examples=int(os.environ.get("MEMLAB_HYPOTHESIS_EXAMPLES", "60")),
                    deadline=None, derandomize=True, database=None)

DTYPES = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16,
                          torch.int64, torch.uint8, torch.bool, torch.complex64])
VALUES = st.sampled_from([0.0, 1.0, -1.0, 1e-30, 1e30, math.inf, -math.inf, math.nan, 3.5])


def _accept(e: Exception, names) -> None:
    """A ValueError/TypeError naming one of ``names``; anything else fails the property."""
    if not isinstance(e, (ValueError, TypeError)):
        raise e
    msg = str(e)
    assert any(n in msg for n in names), f"{type(e).__name__} names no argument: {msg}"


def _tensor(shape, dtype, fill=None):
    x = torch.randn(shape) if fill is None else torch.full(shape, fill)
    return x.to(dtype) if dtype != torch.complex64 else torch.complex(x, x)


# --------------------------------------------------------------------------------------- quant
@SETTINGS
@given(shape=st.lists(st.integers(0, 40), min_size=0, max_size=3), dtype=DTYPES,
       block=st.one_of(st.integers(-3, 600), st.sampled_from([True, 2.5, None, "256"])),
       fill=st.one_of(st.none(), VALUES), signed=st.booleans(),
       code_kind=st.sampled_from(["dynamic", "linear", "short", "unsorted", "int", "nan"]))
def test_quantize_roundtrip_or_clear_error(shape, dtype, block, fill, signed, code_kind):
    code = {"dynamic": lambda: dynamic_map(signed), "linear": lambda: linear_map(signed),
            "short": lambda: dynamic_map(signed)[:100], "int": lambda: torch.arange(256),
            "unsorted": lambda: dynamic_map(signed).flip(0),
            "nan": lambda: torch.full((256,), math.nan)}[code_kind]()
    x = _tensor(tuple(shape), dtype, fill)
    try:
        codes, absmax = quantize_blockwise(x, code, block)
    except Exception as e:  # noqa: BLE001
        _accept(e, ("x", "code", "block_size"))
        return
    assert codes.dtype == torch.uint8 and codes.numel() == x.numel()
    y = dequantize_blockwise(codes, absmax, code, block, shape=x.shape)
    assert y.shape == x.shape
    if x.numel() and bool(torch.isfinite(x.float()).all()):   # (a cast may overflow: inf)
        assert bool(torch.isfinite(y).all())
        # each element within one code gap of its block's absmax
        assert bool(((y - x.float()).abs() <= x.float().abs().max().clamp_min(1e-38) * 2).all())


@SETTINGS
@given(n=st.integers(0, 600), block=st.integers(1, 300), wrong=st.sampled_from(
    ["codes_dtype", "absmax_len", "shape", "dtype", "ok"]))
def test_dequantize_checks_its_arguments(n, block, wrong):
    code = dynamic_map(True)
    codes, absmax = quantize_blockwise(torch.randn(n), code, block)
    args = dict(codes=codes, absmax=absmax, code=code, block_size=block, shape=None,
                dtype=torch.float32)
    if wrong == "codes_dtype":
        args["codes"] = codes.float()
    elif wrong == "absmax_len":
        args["absmax"] = torch.cat([absmax, absmax[:1]]) if absmax.numel() else torch.ones(1)
    elif wrong == "shape":
        args["shape"] = (n + 1,)
    elif wrong == "dtype":
        args["dtype"] = torch.int32
    try:
        out = dequantize_blockwise(**args)
    except Exception as e:  # noqa: BLE001
        _accept(e, ("codes", "absmax", "shape", "dtype", "block_size"))
        assert wrong != "ok"
        return
    assert wrong == "ok" and out.numel() == n


@SETTINGS
@given(shape=st.lists(st.integers(0, 30), min_size=1, max_size=3), signed=st.booleans(),
       block=st.integers(1, 300), fill=st.one_of(st.none(), VALUES))
def test_qtensor_roundtrip(shape, signed, block, fill):
    x = _tensor(tuple(shape), torch.float32, fill)
    if not signed:
        x = x.abs()
    q = QTensor.from_float(x, signed=signed, block_size=block)
    y = q.dequantize()
    assert y.shape == x.shape
    if not signed:       # the zero rule: a positive value never reads back as 0
        assert not bool(((x > 0) & torch.isfinite(x) & (y == 0)).any())


# ---------------------------------------------------------------------------------- transducer
LOSS_NAMES = ("logits", "targets", "logit_lengths", "target_lengths", "blank", "batch",
              "reduction", "clamp", "enc_out", "pred_out", "enc_lengths", "joiner",
              "max_chunk_bytes")


@SETTINGS
@given(B=st.integers(0, 3), T=st.integers(0, 4), U1=st.integers(0, 4), V=st.integers(0, 5),
       el=st.lists(st.integers(-2, 6), max_size=4), tl=st.lists(st.integers(-2, 6), max_size=4),
       tv=st.integers(-2, 6), blank=st.one_of(st.integers(-1, 5), st.just(1.5)),
       dtype=DTYPES, reduction=st.sampled_from(["mean", "sum", "none", "avg", 3]),
       chunk=st.one_of(st.none(), st.sampled_from([0, -1, 1, 10 ** 9, math.nan, math.inf,
                                                  True])))
@example(B=2, T=3, U1=3, V=4, el=[3, 2], tl=[2, 1], tv=1, blank=0, dtype=torch.float32,
         reduction="mean", chunk=None)
def test_losses_give_a_result_or_name_the_argument(B, T, U1, V, el, tl, tv, blank, dtype,
                                                   reduction, chunk):
    logits = _tensor((B, T, U1, V), dtype)
    targets = torch.full((B, max(U1 - 1, 0)), tv)
    lens = torch.tensor(el, dtype=torch.long), torch.tensor(tl, dtype=torch.long)
    for fn in (rnnt_loss_reference, rnnt_loss_batched):
        try:
            out = fn(logits, targets, *lens, blank=blank, reduction=reduction)
        except Exception as e:  # noqa: BLE001
            _accept(e, LOSS_NAMES)
        else:
            assert out.dtype.is_floating_point
    H = 3
    enc = _tensor((B, T, H), dtype)
    pred = _tensor((B, U1, H), dtype)
    lin = nn.Linear(H, max(V, 1))
    try:
        out = samplewise_rnnt_loss(lambda e, p: lin(torch.tanh(e[:, :, None] + p[:, None])),
                                   enc, pred, targets, *lens, blank=blank,
                                   reduction=reduction, max_chunk_bytes=chunk)
    except Exception as e:  # noqa: BLE001
        _accept(e, LOSS_NAMES)
    else:
        assert out.dtype.is_floating_point


# ---------------------------------------------------------------------------------- reversible
@SETTINGS
@given(B=st.integers(0, 3), C=st.integers(0, 7), L=st.integers(0, 5), dtype=DTYPES,
       layers=st.integers(0, 3), chan=st.integers(1, 7), change=st.booleans(),
       ndim=st.integers(1, 4))
@example(B=2, C=4, L=3, dtype=torch.float32, layers=2, chan=4, change=False, ndim=3)
def test_reversible_sequence_gives_a_result_or_names_the_layer(B, C, L, dtype, layers, chan,
                                                               change, ndim):
    c1, c2 = chan - chan // 2, chan // 2 or 1            # the halves x.chunk(2, dim=1) gives
    names = ("layers", "x", "AdditiveCoupling", "ReversibleSequence")
    try:
        seq = ReversibleSequence([
            AdditiveCoupling(nn.Conv1d(c2, c1 + (1 if change and i == layers - 1 else 0), 1),
                             nn.Conv1d(c1, c2, 1)) for i in range(layers)])
        x = _tensor((B, C, L, 1, 1)[:ndim], dtype)
        if x.is_floating_point():
            x.requires_grad_()
        y = seq(x)
        y.sum().backward()
    except Exception as e:  # noqa: BLE001
        _accept(e, names)
        return
    assert y.shape == x.shape and x.grad is not None and x.grad.shape == x.shape


# ------------------------------------------------------------------------------------ optim
OPT_NAMES = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "betas", "eps",
             "min_8bit_size", "block_size", "maximize", "compile", "params")
ODD = st.sampled_from([0.0, 1e-3, -1.0, math.nan, math.inf, True, "0.1", None, 0.999, 1.0])


@SETTINGS
@given(which=st.sampled_from([SGD8bit, Adam8bit, AdamW8bit]), lr=ODD, wd=ODD, extra=ODD,
       block=st.one_of(st.integers(-2, 300), st.just(2.5)), min8=st.integers(-1, 50),
       shapes=st.lists(st.lists(st.integers(0, 9), min_size=0, max_size=3), min_size=1,
                       max_size=3),
       pdtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.int64]),
       gdtype=st.sampled_from([torch.float32, torch.float64, torch.float16]),
       gfill=st.one_of(st.none(), VALUES), compile_=st.sampled_from([None, False, "yes"]))
@example(which=Adam8bit, lr=1e-3, wd=0.0, extra=1e-3, block=64, min8=0, shapes=[[300], [3, 3]],
         pdtype=torch.float32, gdtype=torch.float32, gfill=None, compile_=None)
@example(which=SGD8bit, lr=1e-3, wd=1e-3, extra=0.999, block=256, min8=10, shapes=[[600], []],
         pdtype=torch.float32, gdtype=torch.float64, gfill=None, compile_=False)
def test_optimizers_step_or_name_the_argument(which, lr, wd, extra, block, min8, shapes, pdtype,
                                              gdtype, gfill, compile_):
    try:
        params = [nn.Parameter(_tensor(tuple(s), pdtype), requires_grad=pdtype.is_floating_point)
                  for s in shapes]
    except RuntimeError:
        return                                  # torch refuses integer Parameters with grads
    kw = dict(lr=lr, weight_decay=wd, block_size=block, min_8bit_size=min8, compile=compile_)
    kw["momentum" if which is SGD8bit else "eps"] = extra
    try:
        opt = which(params, **kw)
    except Exception as e:  # noqa: BLE001
        _accept(e, OPT_NAMES)
        return
    for p in params:
        p.grad = _tensor(p.shape, gdtype, gfill).to(p.dtype)
    before = [p.detach().clone() for p in params]
    try:
        opt.step()
    except Exception as e:  # noqa: BLE001
        _accept(e, OPT_NAMES + ("grad", "dtype"))
        for p, b in zip(params, before):       # a refused step changes nothing
            assert torch.equal(p.detach(), b) or bool(torch.isnan(b).any())
        return
    sd = opt.state_dict()
    clone = which([nn.Parameter(p.detach().clone()) for p in params], **kw)
    clone.load_state_dict(sd)                   # its own state always loads back


@SETTINGS
@given(junk=st.sampled_from(["drop_key", "wrong_shape", "wrong_dtype", "stride0", "torch_adam",
                             "extra_group", "step_str", "ok"]))
def test_optimizer_load_state_dict_refuses_or_loads(junk):
    p = nn.Parameter(torch.randn(5000))
    p.grad = torch.randn(5000)
    opt = Adam8bit([p])
    opt.step()
    sd = opt.state_dict()
    st0 = sd["state"][0]
    if junk == "drop_key":
        st0.pop("exp_avg_codes")
    elif junk == "wrong_shape":
        st0["exp_avg_codes"] = st0["exp_avg_codes"][:10]
    elif junk == "wrong_dtype":
        st0["exp_avg_absmax"] = st0["exp_avg_absmax"].double()
    elif junk == "stride0":
        st0["exp_avg_sq_codes"] = torch.zeros(1, dtype=torch.uint8).expand(5000)
    elif junk == "torch_adam":
        ref = torch.optim.Adam([p])
        ref.step()
        sd = ref.state_dict()
    elif junk == "extra_group":
        sd["param_groups"].append(dict(sd["param_groups"][0], params=[1]))
    elif junk == "step_str":
        st0["step"] = "three"
    q = nn.Parameter(p.detach().clone())
    q.grad = p.grad.clone()
    fresh = Adam8bit([q])
    try:
        fresh.load_state_dict(sd)
    except Exception as e:  # noqa: BLE001
        _accept(e, ("state_dict", "param_groups", "state", "exp_avg", "step", "block_size",
                    "min_8bit_size"))
        assert not fresh.state                  # nothing changed on failure
        return
    fresh.step()                                # a loaded state always steps
    assert bool(torch.isfinite(q).all())


# ------------------------------------------------------------------------------ data readers
def _wav(rate, channels, bits, payload: bytes, fmt_tag=1, data_size=None) -> bytes:
    block = max(channels * bits // 8, 0)
    fmt = struct.pack("<HHIIHH", fmt_tag, channels, rate, rate * block, block, bits)
    size = len(payload) if data_size is None else data_size
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + \
        struct.pack("<I", size & 0xFFFFFFFF) + payload
    return b"RIFF" + struct.pack("<I", len(body)) + body


@SETTINGS
@given(rate=st.integers(0, 200_000), channels=st.integers(0, 4),
       bits=st.sampled_from([0, 1, 8, 12, 16, 24, 32, 64]), fmt_tag=st.sampled_from([1, 3, 2]),
       payload=st.binary(max_size=400), size=st.one_of(st.none(), st.integers(0, 2 ** 32 - 1)),
       cut=st.integers(0, 80))
def test_load_audio_reads_or_names_the_file(tmp_path_factory, rate, channels, bits, fmt_tag,
                                            payload, size, cut):
    from memlab.data.audio import load_audio
    raw = _wav(rate, channels, bits, payload, fmt_tag, size)
    raw = raw[:len(raw) - cut] if cut < len(raw) else raw
    path = tmp_path_factory.mktemp("wav") / "x.wav"
    path.write_bytes(raw)
    try:
        wave = load_audio(path)
    except Exception as e:  # noqa: BLE001
        _accept(e, (str(path), "path", "sample_rate"))
        return
    assert wave.dtype == torch.float32 and wave.dim() == 1


@SETTINGS
@given(text=st.binary(max_size=300))
def test_read_manifest_reads_or_names_the_line(tmp_path_factory, text):
    from memlab.data.manifest import read_manifest
    path = tmp_path_factory.mktemp("man") / "m.jsonl"
    path.write_bytes(text)
    try:
        out = read_manifest(path)
    except Exception as e:  # noqa: BLE001
        _accept(e, (str(path), "path"))
        return
    assert isinstance(out, list)


@SETTINGS
@given(n=st.integers(0, 2000), rate=st.one_of(st.integers(-5, 50_000), st.just(16000.5)),
       bins=st.integers(-1, 100), fill=st.one_of(st.none(), VALUES), dtype=DTYPES)
def test_fbank_features_or_names_the_argument(n, rate, bins, fill, dtype):
    from memlab.data.features import fbank
    wave = _tensor((n,), dtype, fill)
    try:
        out = fbank(wave, sample_rate=rate, num_mel_bins=bins)
    except Exception as e:  # noqa: BLE001
        _accept(e, ("wave", "sample_rate", "num_mel_bins"))
        return
    assert out.shape[-1] == bins
