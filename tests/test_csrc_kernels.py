"""The C++ decoding kernels of pyengine._C against independent references: the fused log-softmax + top-k
against float64 PyTorch math, the fused decode-step
attention against float64 softmax(q·kᵀ)·v (also through an indirect cache's row index, and as the encoder
calls it), the residual + layer norm against float64, the step's embedding against PyTorch's float32 ops and float64. (The GPU's top-k is the Triton kernel: tests/test_topk_kernel.py.)"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pyengine import _C

ROOT = Path(__file__).resolve().parents[1]


def reference_topk(logits: torch.Tensor, k: int, banned: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 log_softmax over the whole row, banned ids excluded afterwards, ordered by (value, lower id)."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    logp[:, banned] = float("-inf")
    values, ids = [], []
    for row in logp.tolist():
        order = sorted(range(len(row)), key=lambda i: (-row[i], i))[:k]
        values.append([row[i] for i in order])
        ids.append(order)
    return torch.tensor(values, dtype=torch.float64), torch.tensor(ids)


@pytest.mark.parametrize("rows,vocab,k", [(1, 5, 1), (3, 100, 4), (7, 1000, 8), (5, 58101, 8), (4, 4099, 10),
                                          (2, 300, 300)])
def test_log_softmax_topk_matches_float64(rows, vocab, k):
    gen = torch.Generator().manual_seed(rows * vocab + k)
    logits = torch.randn(rows, vocab, generator=gen) * 4
    banned = torch.randperm(vocab, generator=gen)[: min(3, vocab - k)].tolist()
    values, ids = _C.log_softmax_topk(logits.clone(), k, torch.tensor(banned, dtype=torch.long))
    ref_values, ref_ids = reference_topk(logits, k, banned)
    assert torch.equal(ids, ref_ids)
    finite = torch.isfinite(ref_values)
    torch.testing.assert_close(values.double()[finite], ref_values[finite], rtol=0, atol=2e-5)
    assert torch.equal(torch.isfinite(values), finite)


def test_log_softmax_topk_ties_go_to_the_lower_id_and_banned_ids_are_masked():
    logits = torch.randint(0, 3, (6, 700)).float()  # many equal values
    banned = [0, 1, 699]
    work = logits.clone()
    values, ids = _C.log_softmax_topk(work, 6, torch.tensor(banned))
    ref_values, ref_ids = reference_topk(logits, 6, banned)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(values.double(), ref_values, rtol=0, atol=2e-5)
    assert torch.isinf(work[:, banned]).all() and torch.equal(work[:, 2:699], logits[:, 2:699])


def test_log_softmax_topk_best_candidate_in_the_ragged_tail():
    logits = torch.zeros(2, 130)
    logits[0, 129] = 5.0  # the second, 2-wide chunk
    logits[1, 127] = 5.0
    _, ids = _C.log_softmax_topk(logits, 1, torch.empty(0, dtype=torch.long))
    assert ids[:, 0].tolist() == [129, 127]


def test_log_softmax_topk_rejects_bad_arguments():
    with pytest.raises(RuntimeError, match="contiguous"):
        _C.log_softmax_topk(torch.randn(8, 4).t(), 1, torch.empty(0, dtype=torch.long))
    with pytest.raises(RuntimeError, match="float32"):
        _C.log_softmax_topk(torch.randn(2, 8).double(), 1, torch.empty(0, dtype=torch.long))
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        _C.log_softmax_topk(torch.randn(2, 8), 1, torch.tensor([8]))
    with pytest.raises(RuntimeError, match="k=9"):
        _C.log_softmax_topk(torch.randn(2, 8), 9, torch.empty(0, dtype=torch.long))


def attention_f64(q, k, v, lengths, scale):
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    if lengths is not None:
        pad = torch.arange(k.shape[2])[None, :] >= lengths[:, None]
        scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))
    return scores.softmax(-1) @ v.double()


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])  # a bf16 model's cache is bf16 on CPU
@pytest.mark.parametrize("head_dim", [32, 64, 128, 12, 40])  # register-blocked (32, 64, 128), generic loops
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_decode_attention_on_cache_and_memory_views(head_dim, seed, kv_dtype):
    gen = torch.Generator().manual_seed(seed)
    b, h, beam, layers = 5, 3, 4, 2
    # encoder memory as the model stores it, (L, 2, B, H, S, Dh), ragged source lengths: beams are query rows
    memory = torch.randn(layers, 2, b, h, 11, head_dim, generator=gen).to(kv_dtype)
    lengths = torch.randint(1, 12, (b,), generator=gen)
    q = torch.randn(b, h, beam, head_dim, generator=gen) * 2
    k, v = memory[1, 0], memory[1, 1]
    out = _C.decode_attention(q, k, v, lengths, head_dim ** -0.5)
    torch.testing.assert_close(out.double(), attention_f64(q, k, v, lengths, head_dim ** -0.5), rtol=0, atol=2e-5)
    # the self-attention cache (L, 2, N, H, T_max, Dh) read up to the filled length, one query row, no lengths
    cache = torch.randn(layers, 2, b * beam, h, 16, head_dim, generator=gen).to(kv_dtype)
    q1 = torch.randn(b * beam, h, 1, head_dim, generator=gen)
    k1, v1 = cache[0, 0, :, :, :9], cache[0, 1, :, :, :9]
    out1 = _C.decode_attention(q1, k1, v1, None, 0.3)
    torch.testing.assert_close(out1.double(), attention_f64(q1, k1, v1, None, 0.3), rtol=0, atol=2e-5)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 12])  # register-blocked, generic loops
def test_decode_attention_through_a_row_index(head_dim, kv_dtype):
    """An indirect cache: key j of row b read from physical row rows[b, j] (more physical rows than queries),
    against float64 attention over the keys gathered by hand."""
    gen = torch.Generator().manual_seed(head_dim)
    physical, rows_n, h, t = 9, 6, 3, 7
    cache = torch.randn(2, 2, physical, h, 10, head_dim, generator=gen).to(kv_dtype)
    k, v = cache[1, 0, :, :, :t], cache[1, 1, :, :, :t]
    rows = torch.randint(0, physical, (rows_n, t), generator=gen)
    q = torch.randn(rows_n, h, 1, head_dim, generator=gen)
    out = _C.decode_attention(q, k, v, None, 0.2, rows)
    k_ref = torch.stack([torch.stack([k[rows[b, j], :, j] for j in range(t)], 1) for b in range(rows_n)])
    v_ref = torch.stack([torch.stack([v[rows[b, j], :, j] for j in range(t)], 1) for b in range(rows_n)])
    torch.testing.assert_close(out.double(), attention_f64(q, k_ref, v_ref, None, 0.2), rtol=0, atol=2e-5)
    with pytest.raises(RuntimeError, match="rows index past"):
        _C.decode_attention(q, k, v, None, 0.2, torch.full((rows_n, t), physical))
    with pytest.raises(RuntimeError, match="rows must be"):
        _C.decode_attention(q, k, v, None, 0.2, rows[:, :3])


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128, 12])  # register-blocked (rows 4 or 2 at a time up to 64 keys), generic
@pytest.mark.parametrize("s, key_lengths", [(40, (40, 33, 16, 5)), (70, (70, 64, 17, 1))])  # (past 64: a row at a time)
def test_decode_attention_many_keys_and_query_rows(head_dim, kv_dtype, s, key_lengths):
    """The encoder's use: every token a query row over up to 70 keys, ragged lengths (keys scored 16 at a time:
    whole blocks, a tail, fewer keys than a block; query rows in groups and a remainder), against float64."""
    gen = torch.Generator().manual_seed(7 * head_dim)
    b, h = 4, 2
    qkv = torch.randn(b, s, 3, h, head_dim, generator=gen) * 2
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, S, Dh) views, as the encoder passes them
    k, v = k.to(kv_dtype), v.to(kv_dtype)
    lengths = torch.tensor(key_lengths)
    out = _C.decode_attention(q, k, v, lengths, head_dim ** -0.5)
    torch.testing.assert_close(out.double(), attention_f64(q, k, v, lengths, head_dim ** -0.5), rtol=0, atol=2e-5)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("b,h", [(1, 1), (7, 3), (40, 2)])
def test_decode_attention_splits_uneven_rows_across_threads(threads, b, h):
    """The rows of a continuous batch sit at different positions, the longest first: the tasks are split into
    contiguous parts of about equal work, a few per thread (more threads than tasks too); each (row, head) is
    computed once, as float64 attention says."""
    gen = torch.Generator().manual_seed(b * h)
    lengths = torch.randint(1, 60, (b,), generator=gen).sort(descending=True).values
    lengths[-1] = 1
    q = torch.randn(b, h, 4, 64, generator=gen)
    k, v = torch.randn(2, b, h, 60, 64, generator=gen)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = _C.decode_attention(q, k, v, lengths, 0.125)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(out.double(), attention_f64(q, k, v, lengths, 0.125), rtol=0, atol=2e-5)


@pytest.mark.parametrize("tokens", [24, 130])  # the C++ kernel (≤ CPP_ATTENTION_KEYS), the CPU flash kernel above
def test_encoder_attention_either_kernel_matches_float64(tokens):
    from pyengine.model.backends import CPP_ATTENTION_KEYS, torch_attention
    assert (tokens <= CPP_ATTENTION_KEYS) == (tokens == 24)
    gen = torch.Generator().manual_seed(tokens)
    q, k, v = (torch.randn(3, 4, tokens, 32, generator=gen) for _ in range(3))
    lengths = torch.tensor([tokens, tokens - 5, 3])
    out = torch_attention(q, k, v, lengths)
    ref = attention_f64(q, k, v, lengths, 32 ** -0.5)
    valid = torch.arange(tokens)[None, :] < lengths[:, None]  # padded query rows are never read
    torch.testing.assert_close(out.double().transpose(1, 2)[valid], ref.transpose(1, 2)[valid], rtol=0, atol=2e-5)


def layer_norm_f64(x, residual, weight, bias, eps):
    s = x.double() + (0 if residual is None else residual.double())
    mean = s.mean(-1, keepdim=True)
    var = ((s - mean) ** 2).mean(-1, keepdim=True)
    return (s - mean) / torch.sqrt(var + eps) * weight.double() + bias.double()


@pytest.mark.parametrize("portable", [False, True])  # AVX-512 rows, the scalar twin
@pytest.mark.parametrize("rows,dim", [(1, 1), (7, 12), (5, 512), (300, 520), (3, 1000)])  # tails; threads at 300
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_layer_norm_matches_float64(rows, dim, with_residual, portable):
    gen = torch.Generator().manual_seed(rows * dim)
    x = torch.randn(rows, dim, generator=gen) * 3 + 1.5  # an offset mean: a one-pass variance would lose digits
    residual = torch.randn(rows, dim, generator=gen) if with_residual else None
    weight, bias = torch.randn(dim, generator=gen), torch.randn(dim, generator=gen)
    out = _C.add_layer_norm(x, residual, weight, bias, 1e-5, portable)
    ref = layer_norm_f64(x, residual, weight, bias, 1e-5)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=3e-5 * max(1.0, float(weight.abs().max())))
    if not portable and dim > 1:  # and every row alike whatever its place in the batch (no address dependence)
        alone = _C.add_layer_norm(x[-1:].clone(), None if residual is None else residual[-1:].clone(), weight, bias,
                                  1e-5, False)
        assert torch.equal(alone[0], out[-1])


def test_add_layer_norm_refuses_bad_inputs():
    x, w = torch.randn(2, 8), torch.randn(8)
    with pytest.raises(RuntimeError, match="float32"):
        _C.add_layer_norm(x.double(), None, w, w, 1e-5)
    with pytest.raises(RuntimeError, match="weight and bias"):
        _C.add_layer_norm(x, None, w[:4], w, 1e-5)
    with pytest.raises(RuntimeError, match="residual must be"):
        _C.add_layer_norm(x, torch.randn(2, 4), w, w, 1e-5)


def test_decode_attention_refuses_bad_inputs():
    q, k = torch.randn(2, 2, 1, 8), torch.randn(2, 2, 5, 8)
    with pytest.raises(RuntimeError, match="float32 q"):
        _C.decode_attention(q.double(), k, k, None, 1.0)
    with pytest.raises(RuntimeError, match="both float32 or both bfloat16"):
        _C.decode_attention(q, k, k.bfloat16(), None, 1.0)
    with pytest.raises(RuntimeError, match="unit stride"):
        _C.decode_attention(q, k.transpose(2, 3), k.transpose(2, 3), None, 1.0)
    with pytest.raises(RuntimeError, match="one entry per sentence"):
        _C.decode_attention(q, k, k, torch.tensor([5]), 1.0)



@pytest.mark.parametrize("scale, offset, zero_start", [(1.0, 0, False), (22.627416997969522, 2, False), (16.0, 0, True)])
def test_embed_rows_equals_the_lookup_scale_and_position_add(scale, offset, zero_start):
    """_C.embed_rows against PyTorch's float32 ops in the same order (each product and sum rounded): equal to the bit;
    and against float64 math within float32 rounding."""
    g = torch.Generator().manual_seed(offset)
    table, pos_table = torch.randn(1000, 96, generator=g), torch.randn(40, 96, generator=g)
    ids, positions = torch.randint(0, 1000, (37,), generator=g), torch.randint(0, 40 - offset, (37,), generator=g)
    positions[:3] = 0
    out = _C.embed_rows(table, ids, scale, pos_table, positions, offset, zero_start)
    looked = table[ids] * torch.tensor(scale, dtype=torch.float32)
    if zero_start:
        looked[positions == 0] = 0
    assert torch.equal(out, looked + pos_table[positions + offset])
    kept = (positions != 0) if zero_start else torch.ones(37, dtype=torch.bool)
    exact = table.double()[ids] * scale * kept[:, None] + pos_table.double()[positions + offset]
    torch.testing.assert_close(out.double(), exact, rtol=1e-6, atol=1e-5)


def test_embed_rows_refuses_bad_inputs():
    table, pos = torch.randn(10, 8), torch.randn(6, 8)
    ids, positions = torch.tensor([1, 2]), torch.tensor([0, 5])
    with pytest.raises(RuntimeError, match="token id 10 outside the table's 10"):
        _C.embed_rows(table, torch.tensor([1, 10]), 1.0, pos, positions, 0, False)
    with pytest.raises(RuntimeError, match="position 6 outside the table's 6"):
        _C.embed_rows(table, ids, 1.0, pos, positions, 1, False)
    with pytest.raises(RuntimeError, match="float32"):
        _C.embed_rows(table.double(), ids, 1.0, pos, positions, 0, False)
    with pytest.raises(RuntimeError, match="int64"):
        _C.embed_rows(table, ids.int(), 1.0, pos, positions, 0, False)


def _longest_hold(call) -> tuple[float, float]:
    """(seconds `call()` took, the longest time within it that another Python thread could not run): a C++ function
    that holds the GIL stops the other thread for most of the call."""
    import threading
    import time

    stamps: list[float] = []
    stop = threading.Event()

    def other() -> None:
        while not stop.is_set():
            stamps.append(time.perf_counter())

    thread = threading.Thread(target=other)
    thread.start()
    time.sleep(0.02)
    t0 = time.perf_counter()
    call()
    t1 = time.perf_counter()
    stop.set()
    thread.join()
    points = [t0] + [s for s in stamps if t0 < s < t1] + [t1]
    return t1 - t0, max(b - a for a, b in zip(points, points[1:]))


@pytest.mark.parametrize("op", ["log_softmax_topk", "int8_linear", "bf16_linear", "add_layer_norm"])
def test_compute_functions_release_the_gil(op):
    """A server's HTTP thread answers requests while the worker's decoder step runs in C++: every compute function
    runs without the GIL. One long call each (a GIL held through it stopped the other thread for 75-90% of it
    here; released, the longest stop is a scheduler slice)."""
    g = torch.Generator().manual_seed(0)
    if op == "log_softmax_topk":
        logits, banned = torch.randn(8000, 32000, generator=g), torch.zeros(0, dtype=torch.long)
        call = lambda: _C.log_softmax_topk(logits, 8, banned)  # noqa: E731
    elif op == "add_layer_norm":
        x = torch.randn(65536, 1024, generator=g)
        w, b = torch.ones(1024), torch.zeros(1024)
        call = lambda: _C.add_layer_norm(x, x, w, b, 1e-5)  # noqa: E731
    elif op == "int8_linear":
        q = torch.randint(-127, 128, (1024, 1024), dtype=torch.int8, generator=g)
        packed, colsum = _C.int8_pack(q)
        x, scale = torch.randn(16384, 1024, generator=g), torch.full((1024,), 0.01)
        call = lambda: _C.int8_linear(x, packed, colsum, scale, None, 1024)  # noqa: E731
    else:
        w = torch.randn(1024, 1024, generator=g)
        packed, x = _C.bf16_pack(w), torch.randn(4096, 1024, generator=g)
        call = lambda: _C.bf16_linear(x, packed, None, 1024)  # noqa: E731
    seconds, hold = _longest_hold(call)
    assert hold < 0.4 * seconds, f"{op} kept another thread from running {hold:.3f} s of its {seconds:.3f} s"
