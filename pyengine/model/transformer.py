"""The encoder-decoder Transformer for inference: modules only, no training code, no policy.

Shapes: B sentences, N = B × beam decoder rows, S source length, T target tokens per row in a step,
H heads, Dh head dim, D model dim, L decoder layers, V target vocabulary.
Which implementation runs each operation is the `Ops` given at construction (pyengine.model.backends); how a
decoder step runs its layers is the DecoderStep chosen at load (pyengine.model.step).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig
from .backends import Ops
from .cache import BufferPool, KVCache, RecurrentCache
from .linear import Linear
from .memory import Memory


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


class SSRU(nn.Module):
    """Marian's simpler simple recurrent unit (Kim et al., 2019), the first decoder sub-layer of its
    students: f = σ(x·Wf + bf), c = f ⊙ c_prev + (1 − f) ⊙ x·W, output relu(c)."""

    def __init__(self, dim: int):
        super().__init__()
        self.w = Linear(dim, dim, bias=False)
        self.wf = Linear(dim, dim)

    def forward(self, x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """x (N, T, D), state (N, D) updated in place → (N, T, D)."""
        xw, gate = self.w(x).float(), torch.sigmoid(self.wf(x).float())
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
        self.qkv = Linear(dim, 3 * dim)
        self.out = Linear(dim, dim)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v  # each (B, H, T, Dh)

    def merge(self, ctx: torch.Tensor) -> torch.Tensor:
        b, h, t, dh = ctx.shape
        return self.out(ctx.transpose(1, 2).reshape(b, t, h * dh))


class CrossAttention(nn.Module):
    """Encoder-decoder attention: queries per decoder row, K/V per sentence (fused (2D, D) projection)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q = Linear(dim, dim)
        self.kv = Linear(dim, 2 * dim)
        self.out = Linear(dim, dim)

    def forward(self, x: torch.Tensor, memory: Memory, layer: int, ops: Ops,
                probs_out: list | None = None) -> torch.Tensor:
        """x (N, T, D) with N = B × beam; beams become extra query rows of their sentence (one K/V read serves them)
        — or, spread (Memory.step_view), each row its own group.
        probs_out: if a list, receives the attention weights of each head, (N, H, T, S) float32."""
        n, t, d = x.shape
        b, rows, lengths = memory.step_view()  # b: sentences, or decoder rows when beams differ (Memory.spread)
        q = self.q(x).view(b, n // b * t, self.heads, self.head_dim).transpose(1, 2)  # (B, H, beam·T, Dh)
        k, v = memory.layer(layer)
        if probs_out is not None:
            probs = self.head_probs(q, memory.dense_keys(layer), memory.lengths)  # (B, H, beam·T, S)
            probs_out.append(probs.view(b, self.heads, n // b, t, -1).transpose(1, 2).reshape(n, self.heads, t, -1))
        ctx = ops.attention(q, k, v, lengths, step=True, rows=rows)
        return self.out(ctx.transpose(1, 2).reshape(n, t, d))

    def head_probs(self, q: torch.Tensor, k: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """softmax(q·kᵀ/√Dh) over the unpadded keys, per head, in float32: (B, H, beam·T, S).
        Computed apart from the fused attention, which never materializes the weights."""
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * (self.head_dim ** -0.5)
        pad = torch.arange(k.shape[2], device=k.device)[None, :] >= lengths[:, None]
        scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))
        return torch.softmax(scores, dim=-1)


class FeedForward(nn.Module):
    def __init__(self, dim: int, ffn_dim: int, activation: str):
        super().__init__()
        self.fc1 = Linear(dim, ffn_dim)
        self.fc2 = Linear(ffn_dim, dim)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x, act=self.activation))


def _sublayer(x: torch.Tensor, norm: LayerNorm, pre_norm: bool, fn, ops: Ops) -> torch.Tensor:
    """Residual sub-layer: x + fn(LN(x)) (pre-norm) or LN(x + fn(x)) (post-norm)."""
    if pre_norm:
        return x + fn(ops.add_layer_norm(x, None, norm.weight, norm.bias, norm.eps))
    return ops.add_layer_norm(fn(x), x, norm.weight, norm.bias, norm.eps)


@dataclass(frozen=True)
class Ragged:
    """B sentences of different lengths as one (T, ...) sequence of their tokens (no padding: the encoder's GEMMs,
    layer norms and FFN see real tokens only), and where each token sits in the padded (B, S) layout the
    attention reads. index (T,): b·S + p of each token; positions (T,): p."""

    lengths: torch.Tensor
    width: int
    index: torch.Tensor
    positions: torch.Tensor

    @classmethod
    def of(cls, lengths: list[int], device: torch.device) -> "Ragged":
        width = max(lengths)
        positions = torch.cat([torch.arange(n) for n in lengths]).to(device)
        rows = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(device)
        return cls(torch.tensor(lengths, device=device), width, rows * width + positions, positions)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(T, F) → (B, S, F), zeros where a sentence has no token (finite: attention weights are 0 there)."""
        out = x.new_zeros(self.lengths.shape[0] * self.width, x.shape[-1])
        out[self.index] = x
        return out.view(self.lengths.shape[0], self.width, -1)

    def unpad(self, y: torch.Tensor) -> torch.Tensor:
        """(B, S, F) → (T, F)."""
        return y.reshape(-1, y.shape[-1])[self.index]


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = SelfAttention(cfg.d_model, cfg.encoder_heads)
        self.self_attn_norm = LayerNorm(cfg.d_model, cfg.layer_norm_eps)
        self.ffn = FeedForward(cfg.d_model, cfg.encoder_ffn_dim, cfg.activation)
        self.ffn_norm = LayerNorm(cfg.d_model, cfg.layer_norm_eps)
        self.pre_norm = cfg.normalize_before

    def forward(self, x: torch.Tensor, ragged: Ragged, ops: Ops) -> torch.Tensor:
        """x (T, D): the tokens of B sentences one after the other; only the attention sees them padded."""
        attn = self.self_attn

        def attend(h):
            b, s = ragged.lengths.shape[0], ragged.width
            qkv = ragged.pad(attn.qkv(h)).view(b, s, 3, attn.heads, attn.head_dim)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, S, Dh)
            ctx = ops.attention(q, k, v, ragged.lengths)
            return attn.out(ragged.unpad(ctx.transpose(1, 2).reshape(b, s, -1)))

        x = _sublayer(x, self.self_attn_norm, self.pre_norm, attend, ops)
        return _sublayer(x, self.ffn_norm, self.pre_norm, self.ffn, ops)


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

    def forward(self, x: torch.Tensor, layer: int, cache: KVCache | RecurrentCache, memory: Memory, ops: Ops,
                probs_out: list | None = None) -> torch.Tensor:
        """x (N, T, D): T new tokens per row at the positions the cache's begin_step recorded."""
        def attend_self(h):
            if isinstance(cache, RecurrentCache):
                return self.rnn(h, cache.state[layer])
            q, k, v = self.self_attn.project(h)
            keys, values = cache.write(layer, k, v)
            return self.self_attn.merge(ops.attention(q, keys, values, cache.lengths, causal=True, step=True,
                                                      rows=cache.rows_index))

        x = _sublayer(x, self.self_attn_norm, self.pre_norm, attend_self, ops)
        x = _sublayer(x, self.cross_attn_norm, self.pre_norm,
                      lambda h: self.cross_attn(h, memory, layer, ops, probs_out), ops)
        return _sublayer(x, self.ffn_norm, self.pre_norm, self.ffn, ops)


class Transformer(nn.Module):
    """Embeddings, encoder and decoder stacks and the output layer. `encode` + `remember` once per sentence, then
    `decoder_hidden` and `logits` (or `topk`) per step; weights come from pyengine.model.weights.load_weights."""

    def __init__(self, cfg: ModelConfig, ops: Ops):
        super().__init__()
        self.cfg, self.ops = cfg, ops
        self.step = None  # the DecoderStep, chosen at load
        self.weight_pages = None  # where the packed weights went at load (pages.Placement)
        self.encoder_stack = None  # how the encoder layers run (step.LayerStack or step.CppStack), chosen at load
        self.output = None  # the OutputLayer, built at load
        self.buffer_pool = BufferPool()  # what finished batches leave for the next (recycle)
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

    # -- embeddings ----------------------------------------------------------------------------
    def _embed(self, table: nn.Embedding, ids: torch.Tensor, side: str, positions: torch.Tensor | None,
               end: int) -> torch.Tensor:
        """ids (N, T) → (N, T, D); row r's tokens sit at positions[r].. (None: 0..T-1 for every row)."""
        cfg = self.cfg
        if end > cfg.max_positions:
            raise ValueError(f"position {end} exceeds the model's {cfg.max_positions} positions")
        positions_table = getattr(self, f"{side}_positions") if cfg.positions == "learned" else self.sin_positions
        offset, zero_start = cfg.position_offset, side == "tgt" and cfg.zero_start_embedding
        if ids.shape[1] == 1 and positions is not None and self.ops.embed_rows is not None:
            # one token a row, each at its own position (a decoder step; the encoder's tokens): the backend's one pass
            x = self.ops.embed_rows(table.weight, ids.view(-1), cfg.embed_scale, positions_table, positions, offset,
                                    zero_start)[:, None]
        else:
            x = self._embed_ops(table, ids, positions, positions_table, offset, zero_start)
        if cfg.embedding_norm:
            norm = getattr(self, f"{side}_embed_norm")
            x = self.ops.add_layer_norm(x, None, norm.weight, norm.bias, norm.eps)
        return x

    def _embed_ops(self, table: nn.Embedding, ids: torch.Tensor, positions: torch.Tensor | None,
                   positions_table: torch.Tensor, offset: int, zero_start: bool) -> torch.Tensor:
        """_embed in ATen calls (any device and dtype): the lookup, scale and position add in place on the lookup's
        own output (the module call and advanced indexing cost more than index_select)."""
        x = nn.functional.embedding(ids, table.weight)
        if self.cfg.embed_scale != 1:
            x.mul_(self.cfg.embed_scale)
        if positions is None or ids.shape[1] == 1:  # (one token per row: no arange)
            pos = None if positions is None else positions[:, None]
        else:
            pos = positions[:, None] + torch.arange(ids.shape[1], device=ids.device)
        if zero_start:  # Marian starts decoding from a zero vector (plus position 0)
            first = torch.arange(ids.shape[1], device=ids.device)[None, :] == 0 if pos is None else pos == 0
            x = x.masked_fill(first[:, :, None], 0)
        if pos is None:
            x.add_(positions_table[offset: offset + ids.shape[1]])
        elif ids.shape[1] == 1:
            x.add_(positions_table.index_select(0, positions if offset == 0 else positions + offset)[:, None])
        else:
            x.add_(positions_table[pos + offset])
        return x

    # -- encoder -------------------------------------------------------------------------------
    def encode(self, src: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """src (B, S) right-padded, lengths (B,) → hidden (B, S, D); rows past a length are zeros."""
        ragged = Ragged.of(lengths.tolist(), src.device)
        return ragged.pad(self.encode_ragged(src.view(-1)[ragged.index], ragged))

    def encode_ragged(self, ids: torch.Tensor, ragged: Ragged) -> torch.Tensor:
        """ids (T,): B sentences' tokens one after the other → their encoder output (T, D)."""
        x = self._embed(self.src_embed, ids[:, None], "src", ragged.positions, ragged.width)[:, 0]
        x = self.encoder_stack(self, x, ragged)
        if self.cfg.encoder_final_norm:
            x = self.ops.add_layer_norm(x, None, self.encoder_norm.weight, self.encoder_norm.bias, self.encoder_norm.eps)
        return x

    def new_memory(self, device: torch.device, pooled: bool = False) -> Memory:
        """An empty encoder memory; `pooled`: on the buffer a finished batch left (give it back when done)."""
        attn = self.decoder_layers[0].cross_attn
        return Memory(len(self.decoder_layers), attn.heads, attn.head_dim, self.ops.cache_dtype, device,
                      self.buffer_pool.take("memory") if pooled else None)

    def remember(self, ids: list[list[int]], memory: Memory, allowed: torch.Tensor | None = None) -> None:
        """Encode these sentences (source ids, EOS included) and write every decoder layer's cross-attention K/V
        straight into a block of free slots of `memory`, in its dtype; the sentences join the memory's batch in
        this order. Encoded ragged (no padding), each layer's K/V projection one GEMM over every token."""
        device, lengths = memory.kv.device, [len(x) for x in ids]
        slots = memory.reserve(len(ids), max(lengths))
        ragged = Ragged.of(lengths, device)
        hidden = self.encode_ragged(torch.tensor([t for x in ids for t in x], device=device), ragged)
        token_slots = torch.tensor(slots, device=device)[torch.div(ragged.index, ragged.width, rounding_mode="floor")]
        for i, layer in enumerate(self.decoder_layers):
            self.ops.write_kv(memory.kv, i, layer.cross_attn.kv(hidden), token_slots, ragged.positions)
        memory.append(slots, lengths, allowed)

    # -- decoder -------------------------------------------------------------------------------
    def new_cache(self, device: torch.device, pooled: bool = False) -> KVCache | RecurrentCache:
        """An empty self-attention cache (the recurrent state for SSRU decoders); cohorts reserve rows in it.
        `pooled`: on the buffer a finished batch left (give it back when done)."""
        cfg = self.cfg
        if cfg.decoder_self == "ssru":
            return RecurrentCache(cfg.decoder_layers, cfg.d_model, device)
        return KVCache(cfg.decoder_layers, cfg.decoder_heads, cfg.d_model // cfg.decoder_heads, self.ops.cache_dtype,
                       device, self.buffer_pool.take("kv-cache") if pooled else None,
                       native=self.ops.beam_step == "loop")

    def recycle(self, cache: KVCache | RecurrentCache, memory: Memory) -> None:
        """A finished batch's cache and memory buffers go to the pool new_cache / new_memory(pooled=True) take from."""
        if isinstance(cache, KVCache):
            self.buffer_pool.give("kv-cache", cache.physical)
        self.buffer_pool.give("memory", memory.kv)

    def decoder_hidden(self, tokens: torch.Tensor, cache: KVCache | RecurrentCache, memory: Memory,
                       attention_out: list | None = None) -> torch.Tensor:
        """tokens (N, T) at the positions of cache.begin_step → the decoder's output (N, T, D), before the output
        layer; rows of one sentence adjacent. `attention_out`, a list, receives the last layer's cross-attention
        averaged over heads (N, T, S)."""
        x = self._embed(self.src_embed if self.tgt_embed is None else self.tgt_embed, tokens, "tgt", cache.positions, cache.end)
        x = self.step(self, x, cache, memory, attention_out)
        if self.cfg.decoder_final_norm:
            x = self.ops.add_layer_norm(x, None, self.decoder_norm.weight, self.decoder_norm.bias, self.decoder_norm.eps)
        return x

    def logits(self, x: torch.Tensor, memory: Memory, out: torch.Tensor | None = None) -> torch.Tensor:
        """The output layer on x (N, T, D) → float32 (N, T, V) (into `out` when given). With a shortlist, words
        outside a row's sentence's list get -inf."""
        if memory.vocab is None:
            if out is None:
                return self.output(x).float()
            return self.output(x, out) if x.dtype == torch.float32 else out.copy_(self.output(x))
        logits = memory.output(x).float()
        mask = memory.vocab_mask.repeat_interleave(x.shape[0] // memory.vocab_mask.shape[0], dim=0)
        logits.masked_fill_(~mask[:, None, :], float("-inf"))
        full = torch.empty(x.shape[0], x.shape[1], self.cfg.tgt_vocab_size, device=x.device) if out is None else out
        full.fill_(float("-inf"))
        full.index_copy_(2, memory.vocab, logits)
        return full
