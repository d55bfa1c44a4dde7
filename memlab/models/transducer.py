"""A small Transducer (RNN-T) ASR model: conv subsampling, Transformer encoder, LSTM predictor.

References:
  A. Graves, "Sequence Transduction with Recurrent Neural Networks", 2012 (arXiv 1211.3711):
     encoder + prediction network + joint network, blank as the start symbol of the predictor.
  A. Vaswani et al., "Attention Is All You Need", 2017: encoder layers, sinusoidal positions.
  S. Braun, E. McDermott, R. Hsiao, 2022 (arXiv 2211.16270): the sample-wise loss that
     ``loss="samplewise"`` selects (memlab.transducer.samplewise_rnnt_loss).

Shapes: feats (B, T, F) of 10 ms fbank frames -> subsampling by ``subsample`` (two stride-2
conv2d layers for 4: 40 ms encoder frames) -> enc_out (B, T', enc_dim) with T' = ceil(T / 4);
targets (B, U) -> pred_out (B, U+1, pred_dim); joiner -> logits (B, T', U+1, V).

Encoder choice: pre-norm Transformer encoder layers (torch.nn.TransformerEncoderLayer, 4 heads,
feed-forward 4 x enc_dim) over sinusoidal positions. At memlab's sizes (a few layers of width
~144, a few hundred frames) they train faster on a CPU than a BiLSTM (no sequential time loop)
and need no custom code; a Conformer would add a convolution module per layer for accuracy.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from memlab.memory import on_host
from memlab.models.common import choose
from memlab.transducer import _check_max_chunk_bytes, rnnt_loss_batched, samplewise_rnnt_loss


def _ceil_div(lengths: torch.Tensor, k: int) -> torch.Tensor:
    """ceil(L / k) of integer lengths: frames left after a stride-k front-end step."""
    return torch.div(lengths - 1, k, rounding_mode="floor") + 1


class Subsampling(nn.Module):
    """Conv2d front end: time (and frequency) reduced by 2 per stride-2 layer, then a Linear."""

    def __init__(self, feat_dim: int, out_dim: int, subsample: int = 4, channels: int = 32):
        super().__init__()
        strides = {1: (1, 1), 2: (2, 1), 4: (2, 2)}
        if subsample not in strides:
            raise ValueError(f"subsample must be one of {tuple(strides)}, got {subsample!r}")
        self.strides = strides[subsample]
        s1, s2 = self.strides
        self.conv1 = nn.Conv2d(1, channels, 3, stride=s1, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=s2, padding=1)
        f = feat_dim
        for s in self.strides:
            f = (f - 1) // s + 1          # kernel 3, padding 1: ceil(f / s)
        self.out = nn.Linear(channels * f, out_dim)

    def out_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        for s in self.strides:
            lengths = _ceil_div(lengths, s)
        return lengths

    @staticmethod
    def _mask(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Zero the frames past each length so padding never leaks into valid frames."""
        keep = torch.arange(x.shape[2], device=x.device)[None] < lengths[:, None]  # (B, T)
        return x * keep[:, None, :, None].to(x.dtype)                           # (B, C, T, F)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor):
        """x (B, T, F), lengths (B,) -> (B, T', out_dim), lengths (B,)."""
        x = self._mask(x.unsqueeze(1), lengths)                       # (B, 1, T, F)
        for conv, s in ((self.conv1, self.strides[0]), (self.conv2, self.strides[1])):
            lengths = _ceil_div(lengths, s)
            x = self._mask(torch.relu(conv(x)), lengths)              # (B, C, T/s, F/s)
        B, C, T, F = x.shape
        return self.out(x.permute(0, 2, 1, 3).reshape(B, T, C * F)), lengths  # (B, T', out_dim)


class Stacking(nn.Module):
    """Lean front end: ``subsample`` consecutive frames stacked, then a Linear (low frame rate
    stacking); no conv activations at T/2 x F/2, only the (masked) input and the output."""

    def __init__(self, feat_dim: int, out_dim: int, subsample: int = 4):
        super().__init__()
        if subsample not in (1, 2, 4):
            raise ValueError(f"subsample must be one of (1, 2, 4), got {subsample!r}")
        self.k = subsample
        self.out = nn.Linear(subsample * feat_dim, out_dim)

    def out_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return _ceil_div(lengths, self.k)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor):
        """x (B, T, F), lengths (B,) -> (B, ceil(T / k), out_dim), lengths (B,)."""
        B, T, F = x.shape
        pad = -T % self.k
        keep = torch.arange(T + pad, device=x.device)[None] < lengths[:, None]      # (B, T+pad)
        x = nn.functional.pad(x, (0, 0, 0, pad)) * keep[..., None].to(x.dtype)     # (B, T+pad, F)
        return self.out(x.reshape(B, (T + pad) // self.k, self.k * F)), self.out_lengths(lengths)


class ContextWindow(nn.Module):
    """Front end with syllable-sized context: a 1-D convolution over ``window`` frames (240 ms
    by default) at stride ``subsample``, so every encoder frame sees a whole syllable from the
    first step (self-attention has to learn such locality before it helps: on the syllable corpus
    the model stays on the blank plateau without it). Keeps only its (B, F, T) input for backward
    (a Linear on unfolded windows would keep ``window`` x F values per encoder frame)."""

    def __init__(self, feat_dim: int, out_dim: int, subsample: int = 4, window: int = 24):
        super().__init__()
        if subsample not in (1, 2, 4):
            raise ValueError(f"subsample must be one of (1, 2, 4), got {subsample!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < subsample:
            raise ValueError(f"window must be an int >= subsample={subsample}, got {window!r}")
        self.k, self.window = subsample, window
        self.conv = nn.Conv1d(feat_dim, out_dim, window, stride=subsample)

    def out_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return _ceil_div(lengths, self.k)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor):
        """x (B, T, F), lengths (B,) -> (B, ceil(T / k), out_dim), lengths (B,)."""
        B, T, F = x.shape
        keep = torch.arange(T, device=x.device)[None] < lengths[:, None]            # (B, T)
        x = (x * keep[..., None].to(x.dtype)).transpose(1, 2)                     # (B, F, T)
        Tk = -(-T // self.k)
        left = (self.window - self.k) // 2                     # window centred on its k frames
        x = nn.functional.pad(x, (left, (Tk - 1) * self.k + self.window - left - T))
        return self.conv(x).transpose(1, 2), self.out_lengths(lengths)            # (B, Tk, D)


FRONTENDS = ("conv", "stack", "context")


def sinusoids(length: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Sinusoidal positions (length, dim) of Vaswani et al. (dim may be odd)."""
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]        # (T, 1)
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32)
                     * (-math.log(10000.0) / dim))                                # (ceil(D/2),)
    pe = torch.zeros(length, dim, device=device)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return pe.to(dtype)                                                           # (T, D)


class Predictor(nn.Module):
    """Embedding + LSTM over [blank] + targets: the label encoder / prediction network."""

    def __init__(self, vocab_size: int, dim: int, blank: int = 0):
        super().__init__()
        self.blank = blank
        self.embed = nn.Embedding(vocab_size, dim)
        self.lstm = nn.LSTM(dim, dim, batch_first=True)

    def forward(self, targets: torch.Tensor) -> torch.Tensor:
        start = targets.new_full((targets.shape[0], 1), self.blank)              # (B, 1)
        x = self.embed(torch.cat([start, targets], dim=1))                       # (B, U+1, D)
        return self.lstm(x)[0]                                                   # (B, U+1, D)

    def step(self, tokens: torch.Tensor, state=None):
        """One step: tokens (B,) -> (out (B, D), state)."""
        out, state = self.lstm(self.embed(tokens)[:, None], state)               # (B, 1, D)
        return out[:, 0], state


class Joiner(nn.Module):
    """logits = W_out tanh(W_enc enc + W_pred pred): (N, T, H), (N, U+1, H) -> (N, T, U+1, V).

    ``factors`` (V, K) int (optional): token v is made of the sub-units factors[v, k] (e.g. a
    syllable's onset and nucleus); then W_out[v] = R[v] + sum_k E_k[factors[v, k]], with R
    (``out.weight``) starting at zero, so every sub-unit's row learns from all tokens that share
    it (the output layer is still a general V x J matrix; the logits are the same size).
    """

    def __init__(self, enc_dim: int, pred_dim: int, joint_dim: int, vocab_size: int,
                 factors: Optional[torch.Tensor] = None):
        super().__init__()
        self.enc_proj = nn.Linear(enc_dim, joint_dim)
        self.pred_proj = nn.Linear(pred_dim, joint_dim)
        self.out = nn.Linear(joint_dim, vocab_size)
        self.factor_embed = None
        if factors is not None:
            f = torch.as_tensor(factors)
            if (f.dim() != 2 or f.shape[0] != vocab_size or f.dtype.is_floating_point
                    or f.numel() == 0 or int(f.min()) < 0):
                raise ValueError(f"factors must be a (vocab_size={vocab_size}, K) tensor of "
                                 f"non-negative ints, got {tuple(f.shape)} {f.dtype}")
            self.register_buffer("factors", f.long(), persistent=False)
            self.factor_embed = nn.ParameterList(
                nn.Parameter(torch.randn(int(f[:, k].max()) + 1, joint_dim) / math.sqrt(joint_dim))
                for k in range(f.shape[1]))
            nn.init.zeros_(self.out.weight)

    def forward(self, enc_out: torch.Tensor, pred_out: torch.Tensor) -> torch.Tensor:
        e = self.enc_proj(enc_out)[:, :, None]                                   # (N, T, 1, J)
        p = self.pred_proj(pred_out)[:, None]                                    # (N, 1, U+1, J)
        h = torch.tanh(e + p)                                                    # (N, T, U+1, J)
        if self.factor_embed is None:
            return self.out(h)                                                   # (N, T, U+1, V)
        w = self.out.weight + sum(E[self.factors[:, k]] for k, E in enumerate(self.factor_embed))
        return nn.functional.linear(h, w, self.out.bias)                         # (N, T, U+1, V)


def _check_int_1d(name: str, x, batch: int, device) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {x.dtype}")
    if x.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},), got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} must be on {device} like feats, got {x.device}")


# ----------------------------------------------------------------------------- losses
# loss(model, enc_out (B, T, D), pred_out (B, U+1, P), targets (B, U), enc_lengths, target_lengths)
def batched_loss(model, enc_out, pred_out, targets, enc_lengths, target_lengths):
    """The standard loss on the whole joiner output (rnnt_loss_batched: the 4-D tensor at once)."""
    logits = model.joiner(enc_out, pred_out)                                 # (B, T, U+1, V)
    return rnnt_loss_batched(logits, targets, enc_lengths, target_lengths, blank=model.blank)


def samplewise_loss(model, enc_out, pred_out, targets, enc_lengths, target_lengths):
    """Loss and joiner gradient one sample (or small group) at a time (Braun et al. 2022)."""
    return samplewise_rnnt_loss(model.joiner, enc_out, pred_out, targets, enc_lengths,
                                target_lengths, blank=model.blank,
                                max_chunk_bytes=model.max_chunk_bytes)


def pruned_loss(model, enc_out, pred_out, targets, enc_lengths, target_lengths,
                samplewise: bool = False):
    """Pruned RNN-T (Kuang et al. 2022): a simple additive joint gives per-frame bounds, the
    joiner runs on ``model.prune_range`` symbols per frame only (memlab.pruned)."""
    from memlab.pruned import pruned_rnnt_loss
    return pruned_rnnt_loss(model.joiner, enc_out, pred_out, model.simple_am_proj,  # sample-wise:
                            model.simple_lm_proj, targets, enc_lengths,              # per group
                            target_lengths, s_range=model.prune_range, blank=model.blank,
                            samplewise=samplewise,
                            max_chunk_bytes=model.max_chunk_bytes if samplewise else None)


def samplewise_pruned_loss(model, enc_out, pred_out, targets, enc_lengths, target_lengths):
    """The pruned loss computed one sample (or small group) at a time: simple joint, bounds and
    band, so neither the (B, T, V) simple joint nor the (B, T, S, V) band exists for the batch."""
    return pruned_loss(model, enc_out, pred_out, targets, enc_lengths, target_lengths,
                       samplewise=True)


# loss= name -> loss function (the model's own table; a callable works too)
LOSSES = {"batched": batched_loss, "samplewise": samplewise_loss, "pruned": pruned_loss,
          "samplewise-pruned": samplewise_pruned_loss}
PRUNED = ("pruned", "samplewise-pruned")     # these add the two simple-joint projections


class Transducer(nn.Module):
    """Transducer ASR model; ``forward`` returns the loss, ``greedy_decode`` the token ids.

    Args:
        vocab_size: output classes including blank. feat_dim: fbank bins.
        enc_dim / enc_layers: encoder width and number of Transformer layers (0 allowed).
        pred_dim: predictor width. joint_dim: joiner hidden width.
        loss: "batched" (the whole 4-D tensor at once) or "samplewise" (the names of
            ``LOSSES``), or a callable ``loss(model, enc_out, pred_out, targets, enc_lengths,
            target_lengths) -> scalar``.
        blank: blank index (also the predictor's start symbol). subsample: 1, 2 or 4.
        heads: encoder attention heads (None: 4, or the largest of 2, 1 that divides enc_dim).
        dropout: encoder dropout.
        max_chunk_bytes: budget of one sample-wise joiner call (None: 64 MiB): the sample-wise
            loss's one knob (a group of samples whose logits + gradient fit it runs at once).
        frontend: "conv" (``Subsampling``: two conv layers, the default) or "stack"
            (``Stacking``: ``subsample`` frames stacked into a Linear, no conv activations).
        frontend_channels: channels of the conv front end; its activations at T/2 x F/2 grow
            with them (32: the default). "context": ``ContextWindow`` (a 240-ms convolution at
            stride ``subsample``: syllable-sized context from the first step).
        output_factors: (vocab_size, K) sub-units of every token for a factored output layer
            (``Joiner``'s ``factors``; e.g. memlab.data.syllable_factors); None: plain Linear.
        prune_range: symbols per frame the pruned losses keep (``loss="pruned"`` /
            ``"samplewise-pruned"``, which also add the simple joint's two projections).
    """

    def __init__(self, vocab_size: int, feat_dim: int = 80, enc_dim: int = 144, enc_layers: int = 2,
                 pred_dim: int = 144, joint_dim: int = 144, loss: str = "batched", blank: int = 0,
                 subsample: int = 4, heads: Optional[int] = None, dropout: float = 0.1,
                 max_chunk_bytes: Optional[int] = None, prune_range: int = 5,
                 frontend: str = "conv", frontend_channels: int = 32,
                 output_factors: Optional[torch.Tensor] = None):
        super().__init__()
        self.loss, self._loss_fn = choose("loss", loss, LOSSES)
        if isinstance(prune_range, bool) or not isinstance(prune_range, int) or prune_range < 1:
            raise ValueError(f"prune_range must be an int >= 1, got {prune_range!r}")
        self.prune_range = prune_range
        if not isinstance(vocab_size, int) or vocab_size < 2:
            raise ValueError(f"vocab_size must be an int >= 2 (blank + 1 token), got {vocab_size!r}")
        if not 0 <= blank < vocab_size:
            raise ValueError(f"blank must lie in [0, vocab_size={vocab_size}), got {blank!r}")
        if heads is None:
            heads = next(h for h in (4, 2, 1) if enc_dim % h == 0)
        if not isinstance(heads, int) or heads < 1 or enc_dim % heads:
            raise ValueError(f"heads must be a positive int dividing enc_dim={enc_dim}, got {heads!r}")
        if enc_layers < 0:
            raise ValueError(f"enc_layers must be >= 0, got {enc_layers}")
        self.vocab_size, self.feat_dim, self.blank = vocab_size, feat_dim, blank
        if (isinstance(frontend_channels, bool) or not isinstance(frontend_channels, int)
                or frontend_channels < 1):
            raise ValueError(f"frontend_channels must be an int >= 1, got {frontend_channels!r}")
        _check_max_chunk_bytes(max_chunk_bytes)         # TypeError / ValueError naming it
        self.max_chunk_bytes = max_chunk_bytes
        if frontend not in FRONTENDS:
            raise ValueError(f"frontend must be one of {FRONTENDS}, got {frontend!r}")
        self.subsampling = (Stacking(feat_dim, enc_dim, subsample) if frontend == "stack" else
                            ContextWindow(feat_dim, enc_dim, subsample) if frontend == "context"
                            else Subsampling(feat_dim, enc_dim, subsample, frontend_channels))
        self.encoder = nn.ModuleList(
            nn.TransformerEncoderLayer(enc_dim, heads, 4 * enc_dim, dropout, batch_first=True,
                                       norm_first=True) for _ in range(enc_layers))
        self.enc_norm = nn.LayerNorm(enc_dim)
        self.predictor = Predictor(vocab_size, pred_dim, blank)
        self.joiner = Joiner(enc_dim, pred_dim, joint_dim, vocab_size, output_factors)
        if self.loss in PRUNED:                 # the simple joint: am[t] + lm[u] in vocab space
            self.simple_am_proj = nn.Linear(enc_dim, vocab_size)
            self.simple_lm_proj = nn.Linear(pred_dim, vocab_size)

    # -- checks ---------------------------------------------------------------------------------
    def _check_feats(self, feats, feat_lengths) -> None:
        if not isinstance(feats, torch.Tensor):
            raise TypeError(f"feats must be a torch.Tensor, got {type(feats).__name__}")
        if feats.dim() != 3 or feats.shape[2] != self.feat_dim:
            raise ValueError(f"feats must have shape (B, T, feat_dim={self.feat_dim}), "
                             f"got {tuple(feats.shape)}")
        if not feats.is_floating_point():
            raise TypeError(f"feats must be floating point, got dtype {feats.dtype}")
        B, T, _ = feats.shape
        if B == 0:
            raise ValueError("feats has an empty batch (B = 0)")
        _check_int_1d("feat_lengths", feat_lengths, B, feats.device)
        lo, hi = int(feat_lengths.min()), int(feat_lengths.max())
        if lo < 1 or hi > T:
            raise ValueError(f"feat_lengths must lie in [1, T={T}], got values in [{lo}, {hi}]")

    def _check_targets(self, targets, target_lengths, batch: int, device) -> None:
        if not isinstance(targets, torch.Tensor):
            raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
        if targets.is_floating_point() or targets.dtype == torch.bool:
            raise TypeError(f"targets must be an integer tensor, got dtype {targets.dtype}")
        if targets.dim() != 2 or targets.shape[0] != batch:
            raise ValueError(f"targets must have shape (B={batch}, U), got {tuple(targets.shape)}")
        if targets.device != device:
            raise ValueError(f"targets must be on {device} like feats, got {targets.device}")
        _check_int_1d("target_lengths", target_lengths, batch, device)
        U = targets.shape[1]
        lo, hi = int(target_lengths.min()), int(target_lengths.max())
        if lo < 0 or hi > U:
            raise ValueError(f"target_lengths must lie in [0, U={U}], got values in [{lo}, {hi}]")
        on_host(self._check_target_values, targets, target_lengths)   # fake: no values, no check

    def _check_target_values(self, targets, target_lengths) -> None:
        U = targets.shape[1]
        valid = torch.arange(U, device=targets.device)[None] < target_lengths[:, None]  # (B, U)
        bad = valid & ((targets < 0) | (targets >= self.vocab_size) | (targets == self.blank))
        if bool(bad.any()):
            b, u = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"targets must lie in [0, {self.vocab_size}) and differ from blank="
                             f"{self.blank} within target_lengths, got targets[{b}, {u}] = "
                             f"{int(targets[b, u])}")

    # -- model ----------------------------------------------------------------------------------
    def encode(self, feats: torch.Tensor,
               feat_lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """feats (B, T, F), feat_lengths (B,) -> enc_out (B, T', enc_dim), enc_lengths (B,)."""
        self._check_feats(feats, feat_lengths)
        x, lengths = self.subsampling(feats, feat_lengths.long())                # (B, T', D), (B,)
        T = x.shape[1]
        x = x + sinusoids(T, x.shape[2], x.device, x.dtype)                      # (B, T', D)
        pad = torch.arange(T, device=x.device)[None] >= lengths[:, None]         # (B, T') True = padding
        for layer in self.encoder:
            x = layer(x, src_key_padding_mask=pad)                               # (B, T', D)
        return self.enc_norm(x), lengths

    def forward(self, feats: torch.Tensor, feat_lengths: torch.Tensor, targets: torch.Tensor,
                target_lengths: torch.Tensor) -> torch.Tensor:
        """Mean (over the batch) transducer loss of the utterances."""
        self._check_feats(feats, feat_lengths)
        self._check_targets(targets, target_lengths, feats.shape[0], feats.device)
        enc_out, enc_lengths = self.encode(feats, feat_lengths)                  # (B, T', D), (B,)
        u_max = int(target_lengths.max())
        t_max = int(enc_lengths.max())
        # padding to the longest in the batch only: the 4-D tensor is B x t_max x (u_max+1) x V
        targets = targets[:, :u_max]                                             # (B, U')
        tgt_in = torch.where(torch.arange(u_max, device=targets.device)[None] < target_lengths[:, None],
                             targets, self.blank)                               # padding -> blank
        pred_out = self.predictor(tgt_in)                                        # (B, U'+1, P)
        enc_out = enc_out[:, :t_max]                                             # (B, T'', D)
        return self._loss_fn(self, enc_out, pred_out, tgt_in, enc_lengths, target_lengths)

    @torch.no_grad()
    def greedy_decode(self, feats: torch.Tensor, feat_lengths: torch.Tensor,
                      max_symbols_per_frame: int = 5) -> List[List[int]]:
        """Frame-synchronous greedy search, batched over utterances.

        At each encoder frame every active utterance emits its argmax token until it emits blank
        (or ``max_symbols_per_frame`` tokens); the predictor advances only for utterances that
        emitted. Uses the module's current mode (call ``model.eval()`` first to drop dropout).
        """
        if not isinstance(max_symbols_per_frame, int) or max_symbols_per_frame < 1:
            raise ValueError(f"max_symbols_per_frame must be an int >= 1, got {max_symbols_per_frame!r}")
        enc_out, lengths = self.encode(feats, feat_lengths)                      # (B, T', D), (B,)
        B, T, _ = enc_out.shape
        hyps: List[List[int]] = [[] for _ in range(B)]
        tokens = torch.full((B,), self.blank, dtype=torch.long, device=enc_out.device)
        pred, (h, c) = self.predictor.step(tokens)                               # (B, P)
        for t in range(T):
            active = t < lengths                                                 # (B,)
            if not bool(active.any()):
                break
            frame = enc_out[:, t:t + 1]                                          # (B, 1, D)
            for _ in range(max_symbols_per_frame):
                k = self.joiner(frame, pred[:, None])[:, 0, 0].argmax(-1)        # (B,)
                emit = active & (k != self.blank)                                # (B,)
                if not bool(emit.any()):
                    break
                for b in emit.nonzero()[:, 0].tolist():
                    hyps[b].append(int(k[b]))
                new_pred, (h2, c2) = self.predictor.step(k, (h, c))             # (B, P)
                pred = torch.where(emit[:, None], new_pred, pred)
                h = torch.where(emit[None, :, None], h2, h)                      # (1, B, P)
                c = torch.where(emit[None, :, None], c2, c)
                active = emit
        return hyps
