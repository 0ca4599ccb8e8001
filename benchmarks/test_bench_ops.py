"""Micro-benchmarks (pytest-benchmark) of the CPU ops and one decode step at the opus-mt-en-de shape.

    pytest benchmarks/ --benchmark-only

Timings are reported, never asserted. Shapes: batch 32 × beam 4 = 128 decoder rows, d_model 512,
8 heads, cache length 30, source length 24, vocabulary 58101.
"""
from __future__ import annotations

import pytest
import torch

from pyengine.decoding.processors import log_probs, topk_rows
from pyengine.model import ForcedDecoder, KVCache
from pyengine.model.backends import cpp_add_layer_norm, torch_add_layer_norm, torch_attention
from pyengine.model.cache import Span
from pyengine.model.linear import (Bf16Linear, FloatLinear, Int8Linear, amx_available, bf16_kernels, int8_engines,
                                   vnni_available)

ROWS, HEADS, DH, T, S, V, D = 128, 8, 64, 30, 24, 58101, 512


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decoder_self_attention_step(benchmark, dtype):
    kv = torch.randn(2, ROWS, HEADS, 64, DH)  # a layer of the cache: K and V of every row, 64 positions
    q = torch.randn(ROWS, HEADS, 1, DH, dtype=dtype)
    benchmark(torch_attention, q, kv[0, :, :, :T], kv[1, :, :, :T], None, True, True)


def test_cross_attention_step_beams_share_kv(benchmark):
    q = torch.randn(ROWS // 4, HEADS, 4, DH)  # beams folded into the query axis
    kv = torch.randn(2, ROWS // 4, HEADS, S, DH)  # Memory's layer slice: K and V each contiguous
    benchmark(torch_attention, q, kv[0], kv[1], torch.full((ROWS // 4,), S), False, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_residual_layer_norm(benchmark, dtype):
    x, r = torch.randn(ROWS, 1, D, dtype=dtype), torch.randn(ROWS, 1, D, dtype=dtype)
    w, b = torch.ones(D, dtype=dtype), torch.zeros(D, dtype=dtype)
    benchmark(torch_add_layer_norm, x, r, w, b, 1e-5)


@pytest.mark.parametrize("rows", [32, ROWS])
@pytest.mark.parametrize("impl", ["cpp", "aten"])
def test_residual_layer_norm_step_cpp_vs_aten(benchmark, impl, rows):
    """A decoder step's residual + layer norm: csrc/layer_norm.cpp (int8 and bf16 models, the C++ int8 step) vs ATen's
    add + layer_norm (float models), float32."""
    x, r, w, b = torch.randn(rows, D), torch.randn(rows, D), torch.randn(D), torch.randn(D)
    benchmark(cpp_add_layer_norm if impl == "cpp" else torch_add_layer_norm, x, r, w, b, 1e-5)


@pytest.mark.parametrize("tokens", [24, 128])
@pytest.mark.parametrize("impl", ["cpp", "sdpa"])
def test_encoder_self_attention_cpp_vs_sdpa(benchmark, impl, tokens):
    """The encoder's self-attention over 768 source tokens (32 × 24 or 6 × 128): the C++ attention torch_attention
    uses up to CPP_ATTENTION_KEYS tokens vs the CPU flash kernel (SDPA) it replaces there."""
    from pyengine import _C
    batch = 32 * 24 // tokens
    qkv = torch.randn(batch, tokens, 3, HEADS, DH)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, S, Dh) views, as the encoder has them
    lengths = torch.full((batch,), tokens)
    if impl == "cpp":
        benchmark(_C.decode_attention, q, k, v, lengths, DH ** -0.5)
    else:
        mask = (torch.arange(tokens)[None, :] < lengths[:, None])[:, None, None, :]
        benchmark(torch.nn.functional.scaled_dot_product_attention, q, k, v, attn_mask=mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(D, 2048), (2048, D), (D, V)], ids=["fc1", "fc2", "output"])
def test_linear_onednn_prepacked(benchmark, dtype, shape):
    method = FloatLinear(onednn=True)
    w = method.pack(torch.randn(shape[1], shape[0], dtype=dtype), torch.randn(shape[1], dtype=dtype))
    x = torch.randn(ROWS, 1, shape[0], dtype=dtype)
    with torch.inference_mode():
        benchmark(method.apply, x, w)


OWN_INT8 = (["amx"] if amx_available() else []) + (["vnni"] if vnni_available() else [])
INT8_KERNELS = OWN_INT8 + (["library"] if int8_engines() else [])


@pytest.mark.parametrize("kernel", INT8_KERNELS)
@pytest.mark.parametrize("rows", [1, 32, ROWS])
@pytest.mark.parametrize("shape", [(D, 2048), (2048, D), (D, V)], ids=["fc1", "fc2", "output"])
def test_linear_int8(benchmark, shape, rows, kernel):
    """dtype="int8": pyengine's AMX and VNNI GEMM (the default where the CPU has them; amx runs VNNI at 1 row) next
    to the libraries' dynamic int8 linear (FBGEMM up to 64 rows, oneDNN above) they replaced."""
    method = Int8Linear(kernel)
    w = method.pack(torch.randn(shape[1], shape[0]), torch.randn(shape[1]))
    x = torch.randn(rows, 1, shape[0])
    with torch.inference_mode():
        benchmark(method.apply, x, w)


@pytest.mark.skipif(not bf16_kernels(), reason="pyengine's bf16 GEMM needs AVX-512")
@pytest.mark.parametrize("kernel", list(bf16_kernels()))
@pytest.mark.parametrize("rows", [1, 32, ROWS])
@pytest.mark.parametrize("shape", [(D, 2048), (2048, D), (D, V)], ids=["fc1", "fc2", "output"])
def test_linear_bf16(benchmark, shape, rows, kernel):
    """dtype="bfloat16" on the CPU: bf16 weights, float32 x as two bf16 terms (AMX-BF16 or the AVX-512 FMA tile);
    compare with test_linear_onednn_prepacked (float32, and plain bf16 which rounds x to bf16)."""
    method = Bf16Linear(kernel)
    w = method.pack(torch.randn(shape[1], shape[0]), torch.randn(shape[1]))
    x = torch.randn(rows, 1, shape[0])
    with torch.inference_mode():
        benchmark(method.apply, x, w)


@pytest.mark.skipif(not OWN_INT8, reason="the fused output layer runs pyengine's own int8 GEMM")
@pytest.mark.parametrize("kernel", OWN_INT8)
@pytest.mark.parametrize("rows", [32, ROWS])
@pytest.mark.parametrize("impl", ["fused", "logits+topk"])
def test_output_layer_candidates_fused_vs_logits(benchmark, impl, rows, kernel):
    """A step's candidates (k = 8) from the int8 output layer: fused (the logits never written) against the
    output GEMM writing (rows, V) logits and log_softmax_topk reading them back."""
    from pyengine import _C
    method = Int8Linear(kernel)
    w = method.pack(torch.randn(V, D), torch.randn(V))
    x, banned, out = torch.randn(rows, D), [0], torch.empty(rows, V)
    if impl == "fused":
        benchmark(method.apply_topk, x, w, 8, banned)
    else:
        benchmark(lambda: _C.log_softmax_topk(method.apply(x, w, out=out), 8, torch.tensor(banned)))


@pytest.mark.parametrize("kv", ["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["cpp", "matmul"])
def test_cross_attention_step_cpp_vs_matmul(benchmark, impl, kv):
    """The fused C++ step attention against the two batched matmuls it replaced (beams as query rows)."""
    from pyengine import _C
    dtype = torch.float32 if kv == "fp32" else torch.bfloat16
    q = torch.randn(ROWS // 4, HEADS, 4, DH)
    memory = torch.randn(2, ROWS // 4, HEADS, S, DH).to(dtype)
    lengths = torch.full((ROWS // 4,), S)
    if impl == "cpp":
        benchmark(_C.decode_attention, q, memory[0], memory[1], lengths, DH ** -0.5)
    else:
        def matmuls():
            scores = torch.matmul(q, memory[0].float().transpose(-1, -2)) * DH ** -0.5
            return torch.matmul(torch.softmax(scores, -1), memory[1].float())
        benchmark(matmuls)


def test_beam_candidates_two_level_topk(benchmark):
    logits = torch.randn(ROWS, V)
    benchmark(topk_rows, logits, 8)


def test_beam_candidates_torch_topk(benchmark):
    logits = torch.randn(ROWS, V)
    benchmark(torch.topk, logits, 8, -1)


def test_log_softmax_with_processors(benchmark):
    from pyengine.config import DecodeOptions
    logits = torch.randn(ROWS, V)
    opts = DecodeOptions(beam_size=4, suppress_tokens=(V - 1,), min_decoding_length=5)
    benchmark(log_probs, logits, 3, opts, 0)


def test_kv_cache_reorder(benchmark):
    """A beam reorder of 128 rows at cache length 30: only the indirect cache's (rows, T) origin table moves."""
    cache = KVCache(6, HEADS, DH, torch.float32, torch.device("cpu"))
    cache.append(ROWS)
    cache.begin_step([Span(0, ROWS, T - 1)], torch.tensor(cache.reserve(ROWS, 64)), first_row=0)
    rows = torch.randint(0, ROWS, (ROWS,))
    benchmark(cache.select, rows)


@pytest.fixture(scope="module")
def opus_engines():
    from benchmarks.compare import prepare_model
    import pyengine
    path = prepare_model()
    return {name: pyengine.Engine.load(path, dtype=dtype)
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("int8", "int8"))}


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_decode_step_batch32_beam4(benchmark, opus_engines, dtype):
    """One decoder forward (6 layers + output layer) for 128 rows at cache length 30, through the engine's decoder
    step (the C++ step for int8) and its output layer writing logits."""
    engine = opus_engines[dtype]
    src = torch.randint(2, V - 1, (32, S))
    lengths = torch.full((32,), S)
    with torch.inference_mode():
        forced = ForcedDecoder(engine.model, src, lengths, 64, beam=4)
        forced.logits(torch.zeros(ROWS, T, dtype=torch.long))  # fill 30 positions
        tokens = torch.zeros(ROWS, 1, dtype=torch.long)

        def step():
            forced.position = T
            return forced.logits(tokens)
        benchmark(step)


def test_beam_step_bookkeeping(benchmark):
    """Search bookkeeping of one step at batch 32, beam 4 (outside the model's forward; HF's rules, in C++)."""
    from pyengine.config import DecodeOptions
    from pyengine.decoding.hf_beam import HFBeamState
    opts = DecodeOptions(beam_size=4, max_decoding_length=64)
    state = HFBeamState(32, 4, 64, torch.device("cpu"), "loop")
    cand_logp, cand_ids = torch.topk(torch.log_softmax(torch.randn(ROWS, V), -1), 8, dim=-1)
    benchmark(state.step, cand_logp, cand_ids, 5, opts, 0)
