"""The encoder-decoder Transformer for inference: one file, no training code.

Shapes: B sentences, N = B × beam decoder rows, S source length, T target tokens in a step,
H heads, Dh head dim, D model dim, L decoder layers, V target vocabulary.
Weights are assigned by `load_weights` from a loader's state dict in the names used here.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from .config import ModelConfig
from .errors import CheckpointError


def sinusoid_half(n_positions: int, dim: int) -> torch.Tensor:
    """Marian/XLM table: angle pos / 10000^(2⌊j/2⌋/dim); sin of even j in the first half, cos of odd j after."""
    pos = torch.arange(n_positions, dtype=torch.float64)[:, None]
    j = torch.arange(dim, dtype=torch.float64)
    angle = pos / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / dim)
    sentinel = (dim + 1) // 2
    out = torch.empty(n_positions, dim, dtype=torch.float64)
    out[:, :sentinel] = torch.sin(angle[:, 0::2])
    out[:, sentinel:] = torch.cos(angle[:, 1::2])
    return out.float()


def sinusoid_fairseq(n_positions: int, dim: int) -> torch.Tensor:
    """fairseq/tensor2tensor table: [sin(p·f_i) | cos(p·f_i)], f_i = exp(-ln(10000)·i/(half-1)); odd dims get a 0 column."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000) / (half - 1)))
    angle = torch.arange(n_positions, dtype=torch.float32)[:, None] * freq[None, :]
    out = torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)
    if dim % 2:
        out = torch.cat([out, torch.zeros(n_positions, 1)], dim=1)
    return out


def sinusoid_interleaved(n_positions: int, dim: int) -> torch.Tensor:
    """Vaswani et al. as OpenNMT-py writes it: dimension 2i is sin(p·f_i), 2i+1 is cos(p·f_i), f_i = 1e4^(-2i/dim)."""
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * -(math.log(10000.0) / dim))
    angle = torch.arange(n_positions, dtype=torch.float32)[:, None] * freq
    out = torch.zeros(n_positions, dim)
    out[:, 0::2] = torch.sin(angle)
    out[:, 1::2] = torch.cos(angle)
    return out


POSITION_TABLES = {"sinusoidal_half": sinusoid_half, "sinusoidal_fairseq": sinusoid_fairseq,
                   "sinusoidal_interleaved": sinusoid_interleaved}


class RowPositions(NamedTuple):
    """One new token per decoder row, each at its own position (rows of a continuous batch started at
    different steps): pos (N,), and end = max(pos) + 1, the cache span the step reads."""

    pos: torch.Tensor
    end: int


class KVCache:
    """Preallocated decoder self-attention cache (L, 2, N, H, T_max, Dh), double-buffered.

    Layer-major so each layer's K and V are plain strided blocks for the attention matmuls.
    Reordering rows (beam origin) and dropping rows (finished sentences) run in C++
    (`pyengine._C.kv_cache_select`): on CPU only the rows whose origin changed are copied, in place,
    or, when most rows move, the filled prefix is gathered into the other preallocated buffer. No
    allocation per step (a fresh buffer each step costs more in page faults than the copy itself).
    `reference` keeps the plain one-gather version (torch.index_select) the C++ is measured against.

    `indirect` (lockstep search with the C++ step attention): rows are never moved at all. Row r's token at
    position s is written once, to physical row r, and `origin[r, s]` says which physical row holds the
    position s of (logical) row r; reordering and dropping rows gather only this (rows, T) table
    (FasterTransformer's cache indirection). Sound because all rows write position s in the same step,
    when no row has read it yet. `rows_index` is what the attention reads keys through.
    """

    def __init__(self, rows: int, layers: int, heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, reference: bool = False, indirect: bool = False):
        shape = (layers, 2, rows, heads, max_len, head_dim)
        self._buffers = [torch.empty(shape, dtype=dtype, device=device) for _ in range(1 if indirect else 2)]
        self._active = 0
        self.reference = reference
        self.rows = rows
        self.length = 0  # positions filled
        self.origin = torch.empty(rows, max_len, dtype=torch.long, device=device) if indirect else None
        self.rows_index: torch.Tensor | None = None  # (rows, length) after a write, in indirect mode

    @property
    def buffer(self) -> torch.Tensor:
        return self._buffers[self._active][:, :, : self.rows]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor,
              start: int | RowPositions) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (N, H, T, Dh) at positions start.. (or one token per row at its RowPositions position)
        and return the cached (N, H, end, Dh) views."""
        buf = self.buffer
        end = start.end if isinstance(start, RowPositions) else start + k.shape[2]
        if end > buf.shape[4]:
            raise RuntimeError(f"KV cache overflow: position {end} > capacity {buf.shape[4]}")
        if self.origin is not None:
            return self._write_indirect(layer, k, v, start, end)
        if isinstance(start, RowPositions):
            # rows behind the furthest one read positions they never wrote: masked, but they must hold
            # finite numbers (0 · NaN is NaN in probs · V), so each newly reached position starts at zero
            if end > self.length:
                buf[:, :, :, :, self.length:end] = 0
            rows = torch.arange(k.shape[0], device=k.device)
            buf[layer, 0, rows, :, start.pos] = k[:, :, 0]
            buf[layer, 1, rows, :, start.pos] = v[:, :, 0]
        else:
            buf[layer, 0, :, :, start:end] = k
            buf[layer, 1, :, :, start:end] = v
        self.length = max(self.length, end)
        return buf[layer, 0, :, :, :end], buf[layer, 1, :, :, :end]

    def _write_indirect(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int | RowPositions,
                        end: int) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(start, RowPositions):
            raise RuntimeError("an indirect KV cache decodes rows in lockstep (no RowPositions)")
        n, physical = k.shape[0], self._buffers[0]
        physical[layer, 0, :n, :, start:end] = k
        physical[layer, 1, :n, :, start:end] = v
        if layer == 0:
            self.index_rows(n, start, end)
        return physical[layer, 0, :, :, :end], physical[layer, 1, :, :, :end]

    def index_rows(self, n: int, start: int, end: int) -> None:
        """Indirect mode: rows 0..n-1 write positions start..end-1 to their own physical rows."""
        self.origin[:n, start:end] = torch.arange(n, device=self.origin.device)[:, None]
        self.rows_index = self.origin[:n, :end]
        self.length = max(self.length, end)

    @property
    def physical(self) -> torch.Tensor:
        """The whole (L, 2, P, H, T_max, Dh) buffer an indirect cache writes in place."""
        return self._buffers[0]

    def grow(self, rows: int) -> None:
        """Append `rows` zeroed rows after the current ones (sentences admitted into a running batch,
        at position 0); the buffers are reallocated, at least doubling, when they are full."""
        if self.origin is not None:
            raise RuntimeError("an indirect KV cache does not admit rows (continuous batching uses a direct one)")
        need, capacity = self.rows + rows, self._buffers[0].shape[2]
        if need > capacity:
            shape = list(self._buffers[0].shape)
            shape[2] = max(need, 2 * capacity)
            grown = [torch.empty(shape, dtype=self._buffers[0].dtype, device=self._buffers[0].device) for _ in range(2)]
            grown[0][:, :, : self.rows, :, : self.length] = self.buffer[:, :, :, :, : self.length]
            self._buffers, self._active = grown, 0
        self._buffers[self._active][:, :, self.rows: need, :, : self.length] = 0
        self.rows = need

    def truncate(self, length: int) -> None:
        """Positions at or past `length` are no longer read (the rows that filled them left)."""
        self.length = min(self.length, length)

    def select(self, rows: torch.Tensor) -> None:
        """Keep rows in the given order (beam reorder and finished-row dropping in one gather)."""
        n = rows.numel()
        if self.origin is not None:
            self.origin[:n, : self.length] = self.origin[rows, : self.length]  # a copy is gathered first
            self.rows = n
            return
        if self.reference:
            target = self._buffers[1 - self._active][:, :, :n, :, : self.length]
            if self.length:
                torch.index_select(self.buffer[:, :, :, :, : self.length], 2, rows, out=target)
            self._active = 1 - self._active
        else:
            from . import _C
            if _C.kv_cache_select(self._buffers[self._active], self._buffers[1 - self._active], rows, self.length):
                self._active = 1 - self._active
        self.rows = n


class RecurrentCache:
    """The decoder state of SSRU layers, (L, N, D) cell states in float32, in place of the KV cache
    (same interface: rows are reordered, dropped and appended alike)."""

    def __init__(self, rows: int, layers: int, dim: int, device: torch.device):
        self.state = torch.zeros(layers, rows, dim, device=device)
        self.rows, self.length = rows, 0

    def select(self, rows: torch.Tensor) -> None:
        self.state = self.state.index_select(1, rows)
        self.rows = rows.numel()

    def grow(self, rows: int) -> None:
        self.state = torch.cat([self.state, self.state.new_zeros(self.state.shape[0], rows, self.state.shape[2])], 1)
        self.rows += rows

    def truncate(self, length: int) -> None:
        """Nothing to forget: the state does not grow with the length."""


class Memory:
    """Encoder output prepared for decoding: cross-attention K/V per sentence, computed once.

    kv: (L, 2, B, H, S, Dh), one copy per sentence shared by its beams, layer-major so that each layer's K and
    V are contiguous (B·H, S, Dh) blocks the attention matmuls read in place; lengths: (B,) source lengths.
    With a lexical shortlist: allowed (B, V), the words each sentence may produce; vocab (K,), their union
    (a superset once sentences leave), the ids the output layer computes; vocab_mask (B, K) = allowed[:, vocab];
    output, the output layer restricted to vocab.
    """

    def __init__(self, kv: torch.Tensor, lengths: torch.Tensor):
        self.kv, self.lengths = kv, lengths
        self.allowed = self.vocab = self.vocab_mask = self.output = None

    @property
    def sentences(self) -> int:
        return self.kv.shape[2]

    @property
    def width(self) -> int:
        """Padded source length."""
        return self.kv.shape[4]

    def select(self, sentences: torch.Tensor) -> "Memory":
        out = Memory(self.kv.index_select(2, sentences), self.lengths.index_select(0, sentences))
        if self.allowed is not None:
            out.allowed, out.vocab, out.output = self.allowed.index_select(0, sentences), self.vocab, self.output
            out.vocab_mask = self.vocab_mask.index_select(0, sentences)
        return out

    def concat(self, other: "Memory") -> "Memory":
        """This memory's sentences, then `other`'s, padded to the longer source (padding is masked)."""
        width = max(self.width, other.width)

        def padded(kv: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.pad(kv, (0, 0, 0, width - kv.shape[4]))

        out = Memory(torch.cat([padded(self.kv), padded(other.kv)], dim=2), torch.cat([self.lengths, other.lengths]))
        if self.allowed is not None:
            out.allowed = torch.cat([self.allowed, other.allowed])
        return out


class OutputProjection:
    """The final linear (often the tied target embedding) and its bias, as a layer the ops can pack."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight, self.bias = weight, bias

    def restrict(self, ids: torch.Tensor) -> "OutputProjection":
        """The rows of `ids` only (a shortlisted output layer)."""
        return OutputProjection(self.weight.index_select(0, ids),
                                None if self.bias is None else self.bias.index_select(0, ids))


class SSRU(nn.Module):
    """Marian's simpler simple recurrent unit (Kim et al., 2019), the first decoder sub-layer of its
    students: f = σ(x·Wf + bf), c = f ⊙ c_prev + (1 − f) ⊙ x·W, output relu(c)."""

    def __init__(self, dim: int):
        super().__init__()
        self.w = nn.Linear(dim, dim, bias=False)
        self.wf = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, state: torch.Tensor, ops) -> torch.Tensor:
        """x (N, T, D), state (N, D) updated in place → (N, T, D)."""
        xw, gate = ops.linear(x, self.w).float(), torch.sigmoid(ops.linear(x, self.wf).float())
        cells = []
        c = state
        for t in range(x.shape[1]):
            c = gate[:, t] * c + (1.0 - gate[:, t]) * xw[:, t]
            cells.append(c)
        state.copy_(c)
        return torch.relu(torch.stack(cells, dim=1)).to(x.dtype)


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim))
        self.eps = eps


class SelfAttention(nn.Module):
    """Multi-head self-attention with the q, k, v projections fused into one (3D, D) matrix."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def project(self, x: torch.Tensor, ops) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        qkv = ops.linear(x, self.qkv).view(b, t, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, Dh)
        return q, k, v

    def merge(self, ctx: torch.Tensor, ops) -> torch.Tensor:
        b, h, t, dh = ctx.shape
        return ops.linear(ctx.transpose(1, 2).reshape(b, t, h * dh), self.out)


class CrossAttention(nn.Module):
    """Encoder-decoder attention: queries per decoder row, K/V per sentence (fused (2D, D) projection)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def memory_kv(self, memory: torch.Tensor, ops) -> torch.Tensor:
        """(B, S, D) → (2, B, H, S, Dh) (a view)."""
        b, s, _ = memory.shape
        kv = ops.linear(memory, self.kv).view(b, s, 2, self.heads, self.head_dim)
        return kv.permute(2, 0, 3, 1, 4)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, lengths: torch.Tensor, ops,
                probs_out: list | None = None) -> torch.Tensor:
        """x (N, T, D) with N = B × beam; kv (2, B, H, S, Dh); beams become extra query rows of their sentence.
        probs_out: if a list, receives the attention weights averaged over heads, (N, T, S) float32."""
        n, t, d = x.shape
        b = kv.shape[1]
        beam = n // b
        q = ops.linear(x, self.q).view(b, beam * t, self.heads, self.head_dim).transpose(1, 2)
        if probs_out is not None:
            probs_out.append(self.mean_probs(q, kv[0], lengths).view(n, t, -1))
        # one K/V read per sentence serves all its beams
        ctx = ops.attention(q, kv[0], kv[1], lengths, step=True)  # (B, H, beam·T, Dh)
        ctx = ctx.transpose(1, 2).reshape(n, t, d)
        return ops.linear(ctx, self.out)


    def mean_probs(self, q: torch.Tensor, k: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """softmax(q·kᵀ/√Dh) over the unpadded keys, averaged over heads, in float32: (B, beam·T, S).
        Computed apart from the fused attention, which never materializes the weights."""
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * (self.head_dim ** -0.5)
        pad = torch.arange(k.shape[2], device=k.device)[None, :] >= lengths[:, None]
        scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))
        return torch.softmax(scores, dim=-1).mean(dim=1)


class FeedForward(nn.Module):
    def __init__(self, dim: int, ffn_dim: int, activation: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.activation = activation

    def forward(self, x: torch.Tensor, ops) -> torch.Tensor:
        return ops.linear(ops.linear_act(x, self.fc1, self.activation), self.fc2)


def _sublayer(x: torch.Tensor, norm: LayerNorm, pre_norm: bool, fn, ops) -> torch.Tensor:
    """Residual sub-layer: x + fn(LN(x)) (pre-norm) or LN(x + fn(x)) (post-norm)."""
    if pre_norm:
        return x + fn(ops.add_layer_norm(x, None, norm.weight, norm.bias, norm.eps))
    return ops.add_layer_norm(fn(x), x, norm.weight, norm.bias, norm.eps)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = SelfAttention(cfg.d_model, cfg.encoder_heads)
        self.self_attn_norm = LayerNorm(cfg.d_model, cfg.layer_norm_eps)
        self.ffn = FeedForward(cfg.d_model, cfg.encoder_ffn_dim, cfg.activation)
        self.ffn_norm = LayerNorm(cfg.d_model, cfg.layer_norm_eps)
        self.pre_norm = cfg.normalize_before

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, ops) -> torch.Tensor:
        def attend(h):
            q, k, v = self.self_attn.project(h, ops)
            return self.self_attn.merge(ops.attention(q, k, v, lengths), ops)

        x = _sublayer(x, self.self_attn_norm, self.pre_norm, attend, ops)
        return _sublayer(x, self.ffn_norm, self.pre_norm, lambda h: self.ffn(h, ops), ops)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.decoder_self == "ssru":
            self.rnn = SSRU(cfg.d_model)
        else:
            self.self_attn = SelfAttention(cfg.d_model, cfg.decoder_heads)
        self.self_attn_norm = LayerNorm(cfg.d_model, cfg.layer_norm_eps)
        self.cross_attn = CrossAttention(cfg.d_model, cfg.decoder_heads)
        self.cross_attn_norm = LayerNorm(cfg.d_model, cfg.layer_norm_eps)
        self.ffn = FeedForward(cfg.d_model, cfg.decoder_ffn_dim, cfg.activation)
        self.ffn_norm = LayerNorm(cfg.d_model, cfg.layer_norm_eps)
        self.pre_norm = cfg.normalize_before

    def forward(self, x: torch.Tensor, layer: int, cache: KVCache, start: int | RowPositions,
                kv: torch.Tensor, src_lengths: torch.Tensor, ops, probs_out: list | None = None) -> torch.Tensor:
        def attend_self(h):
            if isinstance(cache, RecurrentCache):
                return self.rnn(h, cache.state[layer], ops)
            q, k, v = self.self_attn.project(h, ops)
            k_all, v_all = cache.write(layer, k, v, start)
            if isinstance(start, RowPositions):  # each row sees its own keys up to its position
                return self.self_attn.merge(ops.attention(q, k_all, v_all, start.pos + 1, step=True), ops)
            return self.self_attn.merge(ops.attention(q, k_all, v_all, None, causal=True, step=True,
                                                      rows=cache.rows_index), ops)

        x = _sublayer(x, self.self_attn_norm, self.pre_norm, attend_self, ops)
        x = _sublayer(x, self.cross_attn_norm, self.pre_norm, lambda h: self.cross_attn(h, kv, src_lengths, ops, probs_out),
                      ops)
        return _sublayer(x, self.ffn_norm, self.pre_norm, lambda h: self.ffn(h, ops), ops)


class Transformer(nn.Module):
    """Encoder + decoder + output layer; call `encode` once, then `decode` per step."""

    def __init__(self, cfg: ModelConfig, ops):
        super().__init__()
        self.cfg, self.ops = cfg, ops
        self.int8_step: list | None = None  # the C++ int8 decoder step's layers, set by load_weights
        d = cfg.d_model
        self.src_embed = nn.Embedding(cfg.src_vocab_size, d)
        self.tgt_embed = None if cfg.shared_embeddings else nn.Embedding(cfg.tgt_vocab_size, d)
        self.lm_head = None if cfg.tie_output else nn.Linear(d, cfg.tgt_vocab_size, bias=False)
        if cfg.final_logits_bias:
            self.final_logits_bias = nn.Parameter(torch.empty(cfg.tgt_vocab_size))
        if cfg.positions == "learned":
            self.src_positions = nn.Parameter(torch.empty(cfg.max_positions + cfg.position_offset, d))
            self.tgt_positions = nn.Parameter(torch.empty(cfg.max_positions + cfg.position_offset, d))
        if cfg.embedding_norm:
            self.src_embed_norm = LayerNorm(d, cfg.layer_norm_eps)
            self.tgt_embed_norm = LayerNorm(d, cfg.layer_norm_eps)
        self.encoder_layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        if cfg.encoder_final_norm:
            self.encoder_norm = LayerNorm(d, cfg.layer_norm_eps)
        if cfg.decoder_final_norm:
            self.decoder_norm = LayerNorm(d, cfg.layer_norm_eps)

    # -- weights -------------------------------------------------------------------------------
    def load_weights(self, state: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device) -> None:
        """Assign every parameter from `state` (our names); missing, extra or mis-shaped tensors are errors."""
        expected = dict(self.named_parameters())
        missing = sorted(set(expected) - set(state))
        extra = sorted(set(state) - set(expected))
        if missing or extra:
            raise CheckpointError(f"checkpoint does not match the model: missing {missing}, unexpected {extra}")
        for name, param in expected.items():
            tensor = state[name]
            if tuple(tensor.shape) != tuple(param.shape):
                raise CheckpointError(f"tensor {name!r} has shape {tuple(tensor.shape)}, "
                                      f"the config implies {tuple(param.shape)}")
            module_name, _, leaf = name.rpartition(".")
            module = self.get_submodule(module_name) if module_name else self
            setattr(module, leaf, nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False))
        cfg = self.cfg
        if cfg.positions in POSITION_TABLES:
            table = POSITION_TABLES[cfg.positions](cfg.max_positions + cfg.position_offset, cfg.d_model)
            self.register_buffer("sin_positions", table.to(device=device, dtype=dtype), persistent=False)
        weight = self._tgt_table.weight if self.lm_head is None else self.lm_head.weight
        self.output = OutputProjection(weight, self.final_logits_bias if cfg.final_logits_bias else None)
        for module in [m for m in self.modules() if isinstance(m, nn.Linear)] + [self.output]:
            self.ops.prepare_linear(module)
        self.int8_step = self._int8_step_layers()

    def _int8_step_layers(self) -> list | None:
        """The decoder layers for the C++ int8 step (`_C.int8_decoder_step`): pyengine's own int8 linears (AMX or
        VNNI) and self-attention decoders; None otherwise (the Python layers run)."""
        if not getattr(self.ops, "own_kernel", False) or self.cfg.decoder_self == "ssru":
            return None
        from . import _C
        return [_C.Int8DecoderLayer(
            l.self_attn.qkv.int8, l.self_attn.out.int8, l.cross_attn.q.int8, l.cross_attn.out.int8,
            l.ffn.fc1.int8, l.ffn.fc2.int8,
            [t.float().contiguous() for n in (l.self_attn_norm, l.cross_attn_norm, l.ffn_norm) for t in (n.weight, n.bias)],
            l.self_attn_norm.eps, l.pre_norm, l.ffn.activation, l.self_attn.heads) for l in self.decoder_layers]

    def shortlist(self, memory: Memory, allowed: torch.Tensor | None = None) -> Memory:
        """Restrict the output layer to the words the memory's sentences may produce (allowed (B, V), or the
        memory's own after a concat): the union is computed, each row masked to its sentence's words."""
        if allowed is not None:
            memory.allowed = allowed
        memory.vocab = memory.allowed.any(dim=0).nonzero()[:, 0]
        memory.vocab_mask = memory.allowed[:, memory.vocab]
        memory.output = self.output.restrict(memory.vocab)
        self.ops.prepare_linear(memory.output)
        return memory

    # -- embeddings ----------------------------------------------------------------------------
    def _positions(self, side: str, start: int | RowPositions, length: int) -> torch.Tensor:
        """(T, D) position vectors, or (N, 1, D) for one token per row at RowPositions."""
        cfg = self.cfg
        end = start.end if isinstance(start, RowPositions) else start + length
        if end > cfg.max_positions:
            raise ValueError(f"position {end} exceeds the model's {cfg.max_positions} positions")
        table = getattr(self, f"{side}_positions") if cfg.positions == "learned" else self.sin_positions
        if isinstance(start, RowPositions):
            return table[start.pos + cfg.position_offset][:, None]
        lo = start + cfg.position_offset
        return table[lo: lo + length]

    def _embed(self, table: nn.Embedding, ids: torch.Tensor, side: str, start: int | RowPositions) -> torch.Tensor:
        x = table(ids) * self.cfg.embed_scale
        if side == "tgt" and self.cfg.zero_start_embedding:  # Marian starts decoding from a zero vector
            if isinstance(start, RowPositions):
                x = x * (start.pos != 0).to(x.dtype)[:, None, None]
            elif start == 0:
                x[:, 0] = 0
        x = x + self._positions(side, start, ids.shape[1])
        if self.cfg.embedding_norm:
            norm = getattr(self, f"{side}_embed_norm")
            x = self.ops.add_layer_norm(x, None, norm.weight, norm.bias, norm.eps)
        return x

    @property
    def _tgt_table(self) -> nn.Embedding:
        return self.src_embed if self.tgt_embed is None else self.tgt_embed

    # -- encoder -------------------------------------------------------------------------------
    def encode(self, src: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """src (B, S) right-padded, lengths (B,) → hidden (B, S, D); rows past a length are padding."""
        x = self._embed(self.src_embed, src, "src", 0)
        for layer in self.encoder_layers:
            x = layer(x, lengths, self.ops)
        if self.cfg.encoder_final_norm:
            x = self.ops.add_layer_norm(x, None, self.encoder_norm.weight, self.encoder_norm.bias, self.encoder_norm.eps)
        return x

    def memory(self, hidden: torch.Tensor, lengths: torch.Tensor) -> Memory:
        """Cross-attention K/V of every decoder layer, once per sentence, in the ops' cache dtype: each layer's
        projection is written (permuted, converted) straight into its slice (a stack, then a conversion,
        were two more passes: 9 ms of a 32-sentence int8 batch)."""
        b, s, _ = hidden.shape
        attn = self.decoder_layers[0].cross_attn
        kv = torch.empty(len(self.decoder_layers), 2, b, attn.heads, s, attn.head_dim, device=hidden.device,
                         dtype=self.ops.cache_dtype(hidden.dtype, hidden.device))
        for i, layer in enumerate(self.decoder_layers):
            kv[i] = layer.cross_attn.memory_kv(hidden, self.ops)
        return Memory(kv, lengths)

    # -- decoder -------------------------------------------------------------------------------
    def new_cache(self, rows: int, max_len: int, device: torch.device, dtype: torch.dtype,
                  reference: bool = False, lockstep: bool = False) -> KVCache:
        """A self-attention cache for `rows` decoder rows of a model running in `dtype` (the recurrent state
        for SSRU decoders). lockstep (every row at the same position, as in `search`): the cache is indirect
        (rows never moved) where the ops' step attention reads keys through a row index."""
        cfg = self.cfg
        if cfg.decoder_self == "ssru":
            return RecurrentCache(rows, cfg.decoder_layers, cfg.d_model, device)
        indirect = lockstep and not reference and self.ops.reads_cache_rows(device)
        return KVCache(rows, cfg.decoder_layers, cfg.decoder_heads, max_len, cfg.d_model // cfg.decoder_heads,
                       self.ops.cache_dtype(dtype, device), device, reference, indirect)

    def decode(self, tokens: torch.Tensor, start: int | RowPositions, cache: KVCache, memory: Memory,
               out: torch.Tensor | None = None, attention_out: list | None = None) -> torch.Tensor:
        """tokens (N, T) at positions start..start+T-1 → float32 logits (N, T, V); rows of one sentence adjacent.
        With RowPositions, T = 1 and each row's token sits at its own position.

        `out`, a preallocated float32 (N, T, V) tensor, receives the logits (no fresh 30 MB per step).
        `attention_out`, a list, receives the last layer's cross-attention averaged over heads (N, T, S).
        """
        x = self._decoder_states(tokens, start, cache, memory, attention_out)
        if memory.vocab is None:
            if out is None:
                return self.ops.linear(x, self.output).float()
            return self.ops.linear(x, self.output, out=out) if x.dtype == torch.float32 else out.copy_(
                self.ops.linear(x, self.output))
        # shortlist: the union's logits, each row's outside its sentence's words -inf, and -inf for the rest
        logits = self.ops.linear(x, memory.output).float()
        mask = memory.vocab_mask.repeat_interleave(x.shape[0] // memory.vocab_mask.shape[0], dim=0)
        logits.masked_fill_(~mask[:, None, :], float("-inf"))
        full = torch.empty(x.shape[0], x.shape[1], self.cfg.tgt_vocab_size, device=x.device) if out is None else out
        full.fill_(float("-inf"))
        full.index_copy_(2, memory.vocab, logits)
        return full

    def fuses_candidates(self, memory: Memory) -> bool:
        """Whether decode_candidates can run: the ops fuse the full output layer with log-softmax + top-k."""
        return memory.vocab is None and self.ops.fuses_candidates(self.output)

    def decode_candidates(self, tokens: torch.Tensor, start: int, cache: KVCache, memory: Memory, k: int,
                          banned: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """One step as decode, then each row's k best (log-prob, token) from the last position (banned ids
        excluded, counted in the normalizer): decoding.candidates' result without writing the logits."""
        x = self._decoder_states(tokens, start, cache, memory)
        return self.ops.linear_candidates(x[:, -1], self.output, k, banned)

    def _decoder_states(self, tokens: torch.Tensor, start: int | RowPositions, cache: KVCache, memory: Memory,
                        attention_out: list | None = None) -> torch.Tensor:
        """The decoder's output (N, T, D) for tokens at start.., before the output layer (decode's first half)."""
        x = self._embed(self._tgt_table, tokens, "tgt", start)
        n, t, d = x.shape
        if (self.int8_step is not None and t == 1 and isinstance(start, int) and attention_out is None
                and getattr(cache, "origin", None) is not None):
            # every layer in one C++ call (the same operations; no Python call per op)
            from . import _C
            cache.index_rows(n, start, start + 1)
            x = _C.int8_decoder_step(self.int8_step, x.view(n, d), cache.physical, start, cache.rows_index,
                                     memory.kv, memory.lengths, kernel=self.ops.kernel).view(n, 1, d)
        else:
            last = len(self.decoder_layers) - 1
            for i, layer in enumerate(self.decoder_layers):
                x = layer(x, i, cache, start, memory.kv[i], memory.lengths, self.ops,
                          attention_out if i == last else None)
        if self.cfg.decoder_final_norm:
            x = self.ops.add_layer_norm(x, None, self.decoder_norm.weight, self.decoder_norm.bias, self.decoder_norm.eps)
        return x
