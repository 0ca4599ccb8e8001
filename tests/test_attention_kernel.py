"""kernels/attention.py under the Triton interpreter against float64 PyTorch: every form the engine
launches, awkward lengths, fully padded rows, mixed lengths, head dims 32/64/80/128."""
from __future__ import annotations

import pytest
import torch

from kernel_tolerance import check
from pyengine.kernels.attention import attention, attention_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _qkv(b, h, tq, tk, dh, dtype, seed, kv_group=1):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, tq, dh, generator=gen).to(dtype)
    k = torch.randn(b // kv_group, h, tk, dh, generator=gen).to(dtype)
    v = torch.randn(b // kv_group, h, tk, dh, generator=gen).to(dtype)
    return q, k, v


def _run(q, k, v, lengths=None, causal=False, kv_group=1, what=""):
    out = torch.full_like(q, float("nan"))
    got = attention(q, k, v, lengths, causal, kv_group, out=out)
    assert got.data_ptr() == out.data_ptr()
    ref = attention_ref(q.double(), k.double(), v.double(), lengths, causal, kv_group)
    low = attention_ref(q, k, v, lengths, causal, kv_group) if q.dtype != torch.float32 else None
    check(got, ref, low, what)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dh", [32, 64, 80, 128])
def test_encoder_padding_mask_mixed_lengths(dtype, dh):
    """Encoder self-attention: lengths 1, 7, 33 and a fully padded row in one batch."""
    q, k, v = _qkv(4, 2, 33, 33, dh, dtype, seed=dh)
    _run(q, k, v, torch.tensor([1, 7, 33, 0]), what="encoder")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tk", [1, 7, 33, 130])
def test_decode_one_token_over_cache_per_row_lengths(dtype, tk):
    """Decoder self-attention for one new token per row; each row has its own cache length."""
    q, k, v = _qkv(3, 3, 1, tk, 64, dtype, seed=tk)
    lengths = torch.tensor([tk, max(1, tk // 2), 1])
    _run(q, k, v, lengths, causal=True, what="decode")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tq,tk", [(7, 7), (33, 33), (5, 130), (130, 130)])
def test_causal_block_of_tokens(dtype, tq, tk):
    """Several new tokens at once after a cache (a target prefix), causal."""
    q, k, v = _qkv(2, 2, tq, tk, 80, dtype, seed=tq + tk)
    _run(q, k, v, None, causal=True, what="causal")


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_attention_beams_share_kv(dtype):
    """Queries per beam row, K/V once per sentence: row → row // beam."""
    beam = 4
    q, k, v = _qkv(3 * beam, 2, 1, 33, 32, dtype, seed=9, kv_group=beam)
    _run(q, k, v, torch.tensor([33, 7, 1]), kv_group=beam, what="cross, grouped")


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_attention_beams_folded_into_queries(dtype):
    """The engine's layout: a sentence's beams are its query rows (B, H, beam·T, Dh)."""
    q, k, v = _qkv(3, 4, 5, 130, 64, dtype, seed=4)
    _run(q, k, v, torch.tensor([130, 2, 33]), what="cross, folded")


def test_strided_views_like_the_kv_cache():
    """k/v as views into a larger preallocated cache buffer; q from a fused qkv projection."""
    gen = torch.Generator().manual_seed(1)
    cache = torch.randn(3, 2, 2, 4, 40, 32, generator=gen)  # (N, L, 2, H, T_max, Dh)
    k, v = cache[:, 1, 0, :, :17], cache[:, 1, 1, :, :17]
    qkv = torch.randn(3, 1, 3, 4, 32, generator=gen).permute(2, 0, 3, 1, 4)
    _run(qkv[0], k, v, torch.tensor([17, 9, 3]), causal=True, what="strided")


def test_launcher_rejects_mismatches():
    q, k, v = _qkv(2, 2, 3, 5, 32, torch.float32, 0)
    with pytest.raises(ValueError, match="do not fit"):
        attention(q, k[:, :1], v[:, :1])
    with pytest.raises(ValueError, match="share one of"):
        attention(q, k.half(), v.half())
    with pytest.raises(ValueError, match="kv_lengths"):
        attention(q, k, v, torch.tensor([1, 2, 3]))
