"""The pre-norm layer stack (x + f(LN(x)), final norms), used by formats such as M2M100/NLLB and
OpenNMT-py, against a float64 reference written here from the formulas, on random weights."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pyengine.config import ModelConfig
from pyengine.model import ForcedDecoder, Transformer, load_weights, resolve_ops
from pyengine.model.transformer import sinusoid_half

CFG = ModelConfig(d_model=24, encoder_layers=2, decoder_layers=2, encoder_heads=3, decoder_heads=3,
                  encoder_ffn_dim=40, decoder_ffn_dim=36, src_vocab_size=50, tgt_vocab_size=50, activation="gelu",
                  pad_id=1, eos_id=2, decoder_start_id=2, max_positions=64, embed_scale=math.sqrt(24),
                  normalize_before=True, encoder_final_norm=True, decoder_final_norm=True, layer_norm_eps=1e-5,
                  shared_embeddings=True, tie_output=True, final_logits_bias=False)


def _random_state(model: Transformer, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in model.named_parameters():
        base = 1.0 if name.endswith("norm.weight") else 0.0
        state[name] = base + 0.3 * torch.randn(p.shape, generator=gen)
    return state


def _ln(x, state, name):
    return F.layer_norm(x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], CFG.layer_norm_eps)


def _mha(q_in, kv_in, state, prefix, heads, mask, fused_qkv):
    d = q_in.shape[-1]
    if fused_qkv:
        w, b = state[f"{prefix}.qkv.weight"], state[f"{prefix}.qkv.bias"]
        q = q_in @ w[:d].T + b[:d]
        k = kv_in @ w[d:2 * d].T + b[d:2 * d]
        v = kv_in @ w[2 * d:].T + b[2 * d:]
    else:
        q = q_in @ state[f"{prefix}.q.weight"].T + state[f"{prefix}.q.bias"]
        wkv, bkv = state[f"{prefix}.kv.weight"], state[f"{prefix}.kv.bias"]
        k, v = kv_in @ wkv[:d].T + bkv[:d], kv_in @ wkv[d:].T + bkv[d:]
    split = lambda t: t.view(t.shape[0], t.shape[1], heads, d // heads).transpose(1, 2)  # noqa: E731
    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(d // heads)
    scores = scores.masked_fill(~mask, float("-inf"))
    ctx = (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(q.shape)
    return ctx @ state[f"{prefix}.out.weight"].T + state[f"{prefix}.out.bias"]


def _ffn(x, state, prefix):
    h = F.gelu(x @ state[f"{prefix}.fc1.weight"].T + state[f"{prefix}.fc1.bias"])
    return h @ state[f"{prefix}.fc2.weight"].T + state[f"{prefix}.fc2.bias"]


def reference(state, src, lengths, tgt):
    """Pre-norm encoder-decoder in float64: x = x + Attn(LN(x)); x = x + FFN(LN(x)); final LN."""
    state = {k: v.double() for k, v in state.items()}
    pos = sinusoid_half(CFG.max_positions, CFG.d_model).double()
    emb = state["src_embed.weight"]
    x = emb[src] * CFG.embed_scale + pos[: src.shape[1]]
    key_mask = (torch.arange(src.shape[1])[None, :] < lengths[:, None])[:, None, None, :]
    for i in range(CFG.encoder_layers):
        p = f"encoder_layers.{i}"
        h = _ln(x, state, f"{p}.self_attn_norm")
        x = x + _mha(h, h, state, f"{p}.self_attn", CFG.encoder_heads, key_mask, True)
        x = x + _ffn(_ln(x, state, f"{p}.ffn_norm"), state, f"{p}.ffn")
    memory = _ln(x, state, "encoder_norm")
    y = emb[tgt] * CFG.embed_scale + pos[: tgt.shape[1]]
    causal = torch.ones(tgt.shape[1], tgt.shape[1], dtype=torch.bool).tril()[None, None]
    for i in range(CFG.decoder_layers):
        p = f"decoder_layers.{i}"
        h = _ln(y, state, f"{p}.self_attn_norm")
        y = y + _mha(h, h, state, f"{p}.self_attn", CFG.decoder_heads, causal, True)
        y = y + _mha(_ln(y, state, f"{p}.cross_attn_norm"), memory, state, f"{p}.cross_attn", CFG.decoder_heads,
                     key_mask, False)
        y = y + _ffn(_ln(y, state, f"{p}.ffn_norm"), state, f"{p}.ffn")
    y = _ln(y, state, "decoder_norm")
    return memory, y @ emb.T


def test_pre_norm_stack_matches_float64_reference():
    with torch.device("meta"):
        model = Transformer(CFG, resolve_ops("torch", torch.device("cpu")))
    state = _random_state(model, seed=4)
    load_weights(model, state, torch.float32, torch.device("cpu"))
    gen = torch.Generator().manual_seed(1)
    src = torch.randint(3, 50, (3, 9), generator=gen)
    lengths = torch.tensor([9, 4, 1])
    tgt = torch.randint(3, 50, (3, 6), generator=gen)
    ref_memory, ref_logits = reference(state, src, lengths, tgt)
    with torch.inference_mode():
        hidden = model.encode(src, lengths)
        forced = ForcedDecoder(model, src, lengths, 8)
        stepwise = torch.cat([forced.logits(tgt[:, t:t + 1]) for t in range(6)], 1)
    valid = torch.arange(9)[None, :] < lengths[:, None]
    assert torch.allclose(hidden.double()[valid], ref_memory[valid], atol=1e-5, rtol=0)
    assert torch.allclose(stepwise.double(), ref_logits, atol=1e-4, rtol=0)
