"""Work shared by stealing (csrc/parallel.h): a GEMM's column tiles, the fused output layer's parts and the step
attention's parts start as one contiguous share per thread, and a thread done early takes items from the end of
another's share, so which thread computes what changes from call to call (more threads than cores here: some are
descheduled mid-share and the others take their items). No item may be skipped or done twice, and no result may
depend on who ran it: every result below equals the one-thread result to the bit, and the fused output layer's
candidates equal float64 math (its normalizer is summed per part in part order, its k best merged by value, then
the lower id, whatever order a thread met the parts in)."""
from __future__ import annotations

import pytest
import torch

from pyengine import _C
from pyengine.quant import quantize_rows

THREADS = [2, 3, 7]
CALLS = 4  # per thread count: each a different schedule


def with_threads(threads: int, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return [fn() for _ in range(CALLS)]
    finally:
        torch.set_num_threads(before)


def assert_all_equal(results, alone):
    for result in results:
        for got, want in zip(result if isinstance(result, tuple) else (result,),
                             alone if isinstance(alone, tuple) else (alone,)):
            assert torch.equal(got, want)


@pytest.fixture(scope="module")
def operands():
    """An output layer of 3000 columns (47 tiles: 16 parts of 2-3 tiles) whose rows 5, 1500 and 2999 are equal (the
    best logits, in three parts), 40 rows (AMX blocks and a ragged one), and a K of 512."""
    gen = torch.Generator().manual_seed(11)
    n, k = 3000, 512
    w = torch.randn(n, k, generator=gen) * 0.05
    w[[5, 1500, 2999]] = 0.2
    x = torch.rand(40, k, generator=gen) + 0.5  # positive: the repeated rows give each row's best logit
    bias = torch.zeros(n)
    return x, w, bias


@pytest.mark.parametrize("threads", THREADS)
def test_int8_gemm_and_fused_output_layer_do_not_depend_on_threads(operands, threads):
    x, w, bias = operands
    n = w.shape[0]
    q, scale = quantize_rows(w)
    packed, colsum = _C.int8_pack(q)
    banned = torch.tensor([0])
    linear = lambda: _C.int8_linear(x, packed, colsum, scale, bias, n)  # noqa: E731
    fused = lambda: _C.int8_linear_log_softmax_topk(x, packed, colsum, scale, bias, n, 6, banned)  # noqa: E731
    alone = with_threads(1, linear)[0], with_threads(1, fused)[0]
    assert_all_equal(with_threads(threads, linear), alone[0])
    assert_all_equal(with_threads(threads, fused), alone[1])
    values, ids = alone[1]
    assert ids[:, :3].tolist() == [[5, 1500, 2999]] * len(x)  # equal logits: the lower id first
    logp = torch.log_softmax(alone[0].double(), dim=-1)  # against float64 over the GEMM's logits
    logp[:, 0] = float("-inf")
    ref_values, _ = logp.topk(6, dim=-1)
    torch.testing.assert_close(values.double(), ref_values, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("threads", THREADS)
def test_bf16_gemm_and_fused_output_layer_do_not_depend_on_threads(operands, threads):
    x, w, bias = operands
    n = w.shape[0]
    packed = _C.bf16_pack(w)
    banned = torch.tensor([0])
    linear = lambda: _C.bf16_linear(x, packed, bias, n)  # noqa: E731
    fused = lambda: _C.bf16_linear_log_softmax_topk(x, packed, bias, n, 6, banned)  # noqa: E731
    alone = with_threads(1, linear)[0], with_threads(1, fused)[0]
    assert_all_equal(with_threads(threads, linear), alone[0])
    assert_all_equal(with_threads(threads, fused), alone[1])
    assert alone[1][1][:, :3].tolist() == [[5, 1500, 2999]] * len(x)


@pytest.mark.parametrize("threads", THREADS)
def test_step_attention_does_not_depend_on_threads(threads):
    gen = torch.Generator().manual_seed(threads)
    b, h = 24, 8  # 192 tasks in a few parts a thread
    lengths = torch.randint(1, 50, (b,), generator=gen)
    q = torch.randn(b, h, 4, 64, generator=gen)
    k, v = torch.randn(2, b, h, 50, 64, generator=gen)
    attend = lambda: _C.decode_attention(q, k, v, lengths, 0.125)  # noqa: E731
    assert_all_equal(with_threads(threads, attend), with_threads(1, attend)[0])
