"""kernels/topk.py (the GPU's log-softmax + top-k) under the Triton interpreter against float64 PyTorch and
pyengine's C++ CPU op, which share its contract: ties to the lower id, banned ids in the normalizer but never
candidates, their logits overwritten with -inf."""
from __future__ import annotations

import pytest
import torch

from pyengine import _C
from pyengine.kernels.topk import launch_config, log_softmax_topk


def reference(logits: torch.Tensor, k: int, banned: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 log-softmax over the whole row; candidates ranked by value, then lower id, banned ones last."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    ranked = logits.double().clone()
    ranked[:, banned] = float("-inf")
    ids = torch.arange(logits.shape[1])
    values, out_ids = [], []
    for row, logp_row in zip(ranked, logp):
        order = sorted(range(len(row)), key=lambda i: (-row[i].item(), i))[:k]
        out_ids.append(ids[order])
        values.append(torch.where(row[order] == float("-inf"), float("-inf"), logp_row[order]))
    return torch.stack(values), torch.stack(out_ids)


def logits_with_ties(rows: int, vocab: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = 4 * torch.randn(rows, vocab, generator=gen)
    x[:, vocab // 3] = x[:, vocab // 2] = x[:, -1] = x.max() + 1  # a three-way tie at the top, one in the tail
    if rows > 1:
        x[1] = 0.25  # a row of equal logits
    return x


@pytest.mark.parametrize("rows,vocab,k,banned", [
    (3, 37, 5, [2, 36]),  # one short block
    (4, 1000, 8, [0, 12, 999]),  # a ragged last block
    (2, 4099, 10, []),  # blocks of 2048 and a one-element tail
    (2, 17, 17, []),  # k = V
    (3, 40, 40, [1, 7]),  # k = V with banned ids: they come last, at -inf, by id
    (5, 300, 1, [5]),  # greedy
])
def test_matches_float64_and_the_cpp_op(rows, vocab, k, banned):
    x = logits_with_ties(rows, vocab, rows * vocab + k)
    got_x, cpp_x = x.clone(), x.clone()
    values, ids = log_softmax_topk(got_x, k, banned)
    ref_values, ref_ids = reference(x, k, banned)
    assert torch.equal(ids, ref_ids)
    finite = torch.isfinite(ref_values)
    assert torch.equal(torch.isfinite(values), finite)
    torch.testing.assert_close(values[finite].double(), ref_values[finite], rtol=0, atol=2e-6)
    cpp_values, cpp_ids = _C.log_softmax_topk(cpp_x, k, torch.tensor(banned, dtype=torch.long))
    assert torch.equal(ids, cpp_ids)
    torch.testing.assert_close(values, cpp_values, rtol=0, atol=2e-6)
    assert torch.equal(got_x, cpp_x)  # banned logits overwritten with -inf, as the C++ op does


def test_a_real_vocabulary_and_beam_width():
    """58101 ids (opus-mt-en-de), k = 2 × beam 4, EOS banned under the minimum length."""
    x = logits_with_ties(3, 58101, 1)
    values, ids = log_softmax_topk(x.clone(), 8, [0, 58100])
    ref_values, ref_ids = reference(x, 8, [0, 58100])
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(values.double(), ref_values, rtol=0, atol=1e-5)


def test_no_rows_and_named_errors():
    values, ids = log_softmax_topk(torch.empty(0, 10), 3, [])
    assert values.shape == ids.shape == (0, 3)
    with pytest.raises(ValueError, match="outside"):
        log_softmax_topk(torch.randn(2, 10), 11, [])
    with pytest.raises(ValueError, match="banned token id"):
        log_softmax_topk(torch.randn(2, 10), 3, [10])
    with pytest.raises(ValueError, match="float32"):
        log_softmax_topk(torch.randn(2, 10).double(), 3, [])


def test_launch_config_covers_small_and_large_vocabularies():
    assert launch_config(37)["BLOCK_V"] == 64
    assert launch_config(58101) == {"BLOCK_V": 2048, "BLOCK_M": 16, "num_warps": 8}
