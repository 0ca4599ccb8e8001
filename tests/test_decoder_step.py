"""The C++ decoder step (csrc/decoder_step.cpp: every layer of a step in one call) and encoder stack
(csrc/encoder_stack.cpp) against the Python layers over the same Ops, for each weight type they run (int8, bf16) and
each of pyengine's own kernels of that type on this CPU: the decoder's output at every step of a running batch, and the
encoder's output of a cohort of ragged sources, are equal to the bit. The Python layers are the reference
because every operation in them is tested against float64 math elsewhere (tests/test_int8.py, test_bf16_gemm.py,
test_csrc_kernels.py); the engine's tokens against the training libraries' decoders: the parity tests."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import pyengine
from conftest import AMX_ARCH, ARCHS, build_marian
from pyengine import _C
from pyengine.config import DecodeOptions, ModelConfig
from pyengine.decoding import Runtime, rules_for
from pyengine.model import Transformer, load_weights, resolve_ops
from pyengine.model import backends
from pyengine.model.backends import CPP_ATTENTION_KEYS
from pyengine.model.f32_linear import f32_available
from pyengine.model.linear import FloatLinear, Linear, amx_available, bf16_kernels, vnni_available
from pyengine.model.step import CppStack, CppStep, LayerStack, LayerStep
from pyengine.model.transformer import Ragged

KERNELS = {"int8": (["amx"] if amx_available() else []) + (["vnni"] if vnni_available() else []),
           "bf16": list(bf16_kernels())}
# pyengine's own float32 GEMM (F32Linear: the CPU's float32 where it has AVX-512), its tile and its portable loop
KERNELS["f32"] = ["avx512", "portable"] if f32_available() else []
CASES = [(kind, kernel) for kind, kernels in KERNELS.items() for kernel in kernels]
# the step also runs PyTorch's float32 linears, FloatLinear's operations from C++ (oneDNN's prepacked weight, or not)
STEP_CASES = CASES + [("float32", "onednn"), ("float32", "library")]
DTYPE = {"int8": "int8", "bf16": "bfloat16", "float32": "float32", "f32": "float32"}


def _running_batch_outputs(model, cohorts: list[list[list[int]]], steps: int, beam: int = 2) -> list[torch.Tensor]:
    """The decoder's output at every step of a running batch whose cohorts (source id lists) are admitted at steps
    0, 2, 4, ...: rows at different positions, beams reordered by the search, through the indirect cache."""
    cfg = model.cfg
    opts = DecodeOptions(beam_size=beam, max_decoding_length=steps, min_decoding_length=steps)
    runtime = Runtime(model, rules_for("hf"), opts, torch.device("cpu"), cfg.decoder_start_id, cfg.eos_id)
    inner, outputs = model.decoder_hidden, []
    model.decoder_hidden = lambda *a, **kw: (outputs.append(inner(*a, **kw).clone()), outputs[-1])[1]
    try:
        with torch.inference_mode():
            step = 0
            while step == 0 or runtime.cohorts:
                if step % 2 == 0 and step // 2 < len(cohorts):
                    runtime.admit(cohorts[step // 2], list(range(len(cohorts[step // 2]))))
                runtime.step()
                step += 1
    finally:
        del model.decoder_hidden
    return outputs


def _use_kernel(model, kind: str, kernel: str) -> None:
    """The same packed weights run by another of pyengine's kernels of their type (they share one layout); float32
    (FloatLinear, float_linear_for): the weights packed again for oneDNN or not, the step only (the encoder stays in
    Python)."""
    if kind == "float32":
        model.ops.linear.onednn = kernel == "onednn"
        for module in model.modules():
            if isinstance(module, Linear):  # (a FloatWeight keeps the float weight and bias it was packed from)
                module.packed = model.ops.linear.pack(module.packed.weight, module.packed.bias)
    else:
        model.ops.linear.kernel = kernel
    model.step = CppStep(model, kind, kernel)
    if kind != "float32":
        model.encoder_stack = CppStack(model, kind, kernel)


def _prenorm_model(kind: str, kernel: str):
    cfg = ModelConfig(d_model=24, encoder_layers=2, decoder_layers=2, encoder_heads=3, decoder_heads=3,
                      encoder_ffn_dim=40, decoder_ffn_dim=36, src_vocab_size=50, tgt_vocab_size=50, activation="relu",
                      pad_id=1, eos_id=2, decoder_start_id=2, max_positions=64, embed_scale=math.sqrt(24),
                      normalize_before=True, encoder_final_norm=True, decoder_final_norm=True, layer_norm_eps=1e-5,
                      shared_embeddings=True, tie_output=True, final_logits_bias=False)
    weights = "float" if kind in ("float32", "f32") else kind
    model = Transformer(cfg, resolve_ops("torch", torch.device("cpu"), weights=weights))
    gen = torch.Generator().manual_seed(4)
    state = {name: (1.0 if name.endswith("norm.weight") else 0.0) + 0.3 * torch.randn(p.shape, generator=gen)
             for name, p in model.named_parameters()}
    load_weights(model, state, torch.float32, torch.device("cpu"))
    _use_kernel(model, kind, kernel)
    return model


def _model(arch: str, kind: str, kernel: str, tmp_path, monkeypatch):
    """The test's model of `arch` (a Marian shape, or pre-norm) with `kind` weights run by `kernel`; float32: with
    PyTorch's linears (FloatLinear), not the engine's own float32 GEMM."""
    if kind == "float32":
        monkeypatch.setattr(backends, "float_linear_for", lambda device, dtype: FloatLinear())
    if arch == "pre-norm":
        return _prenorm_model(kind, kernel)
    path = build_marian(tmp_path, **(AMX_ARCH if arch == "amx-shaped" else ARCHS[arch]))
    model = pyengine.Engine.load(path, dtype=DTYPE[kind]).model
    _use_kernel(model, kind, kernel)
    return model


@pytest.mark.parametrize("kind,kernel", STEP_CASES)
@pytest.mark.parametrize("arch", [*sorted(ARCHS), "amx-shaped", "pre-norm"])
def test_cpp_decoder_step_equals_the_python_layers(arch, kind, kernel, tmp_path, monkeypatch):
    """The C++ step (all layers in one call) runs the Python layers' operations in their order: the decoder's
    output at every step of a running batch is equal to the bit, post-norm (swish, relu, gelu) and pre-norm,
    with cohorts at different positions and beams reordered; with each of pyengine's kernels for the weight type
    (the AMX-shaped model's rows run AMX tiles where the kernel is amx)."""
    model = _model(arch, kind, kernel, tmp_path, monkeypatch)
    assert isinstance(model.step, CppStep) and model.step.name == f"cpp-{kind}"
    gen = torch.Generator().manual_seed(1)
    cohorts = [[torch.randint(3, 40, (n,), generator=gen).tolist() + [model.cfg.eos_id] for n in lengths]
               for lengths in ([7, 4], [6, 5], [3])]
    if arch == "amx-shaped" and kind == "int8":
        assert _C.int8_kernel_name(kernel, 8, model.cfg.d_model) == kernel
    calls = []
    step = _C.decoder_step
    monkeypatch.setattr(_C, "decoder_step", lambda *a, **kw: (calls.append(kw["kernel"]), step(*a, **kw))[1])
    fast = _running_batch_outputs(model, cohorts, steps=6)
    assert len(calls) == len(fast) and set(calls) == {kernel}  # every step ran in C++, with the kernel asked for
    cpp, model.step = model.step, LayerStep()
    try:
        python = _running_batch_outputs(model, cohorts, steps=6)
    finally:
        model.step = cpp
    assert len(calls) == len(fast) == len(python) == 10  # 6 steps from step 0, the last cohort's end at step 9
    for i, (a, b) in enumerate(zip(fast, python)):
        assert torch.equal(a, b), f"step {i}: max |Δ| {(a - b).abs().max():.3g}"
    assert not torch.equal(fast[0], fast[1])  # the steps differ: the cache and positions were used


@pytest.mark.skipif(not CASES, reason="no C++ encoder stack here: neither AVX512-VNNI nor AVX-512")
@pytest.mark.parametrize("kind,kernel", CASES)
@pytest.mark.parametrize("arch", [*sorted(ARCHS), "amx-shaped", "pre-norm"])
def test_cpp_encoder_stack_equals_the_python_layers(arch, kind, kernel, tmp_path, monkeypatch):
    """The C++ encoder stack (all layers in one call) runs the Python layers' operations in their order: a cohort of
    ragged sources (1 to 20 tokens) encodes equal to the bit, post-norm (swish, relu, gelu) and pre-norm, with each
    of pyengine's kernels for the weight type; sources past CPP_ATTENTION_KEYS tokens run the Python layers."""
    model = _model(arch, kind, kernel, tmp_path, monkeypatch)
    assert isinstance(model.encoder_stack, CppStack) and model.encoder_stack.name == f"cpp-{kind}"
    gen = torch.Generator().manual_seed(2)
    lengths = [7, 1, 20, 4, 13]
    ids = torch.randint(3, 40, (sum(lengths),), generator=gen)
    calls = []
    stack = _C.encoder_stack
    monkeypatch.setattr(_C, "encoder_stack", lambda *a, **kw: (calls.append(kw["kernel"]), stack(*a, **kw))[1])
    with torch.inference_mode():
        ragged = Ragged.of(lengths, torch.device("cpu"))
        fast = model.encode_ragged(ids, ragged)
        cpp, model.encoder_stack = model.encoder_stack, LayerStack()
        try:
            python = model.encode_ragged(ids, ragged)
        finally:
            model.encoder_stack = cpp
        assert calls == [kernel] and torch.equal(fast, python), f"max |Δ| {(fast - python).abs().max():.3g}"
        long = Ragged.of([CPP_ATTENTION_KEYS + 1, 3], torch.device("cpu"))  # (past these models' positions: the
        x = torch.randn(CPP_ATTENTION_KEYS + 4, model.cfg.d_model, generator=gen)  # layers alone, embedded tokens given)
        assert torch.equal(model.encoder_stack(model, x, long), LayerStack()(model, x, long))
        assert calls == [kernel]  # the long source ran the Python layers


@pytest.mark.parametrize("zero_start, offset, positions, norm", [(False, 0, "sinusoidal_half", False),
                                                                 (True, 0, "sinusoidal_half", False),
                                                                 (False, 2, "learned", True)])
def test_step_embedding_in_one_cpp_pass_equals_the_aten_calls(zero_start, offset, positions, norm):
    """A step's (and the encoder's) embedding, one token a row at its own position, through the backend's C++ pass
    (`_C.embed_rows`) and through ATen's calls (`_embed_ops`): equal to the bit, Marian's zero first decoder input,
    BART's learned positions at offset 2 and embedding layer norm included."""
    cfg = ModelConfig(d_model=24, encoder_layers=1, decoder_layers=1, encoder_heads=3, decoder_heads=3,
                      encoder_ffn_dim=40, decoder_ffn_dim=36, src_vocab_size=50, tgt_vocab_size=50, activation="relu",
                      pad_id=1, eos_id=2, decoder_start_id=2, max_positions=64, embed_scale=math.sqrt(24),
                      positions=positions, position_offset=offset, zero_start_embedding=zero_start,
                      embedding_norm=norm, shared_embeddings=True)
    ops = resolve_ops("torch", torch.device("cpu"))
    assert ops.report["embed_rows"] == "cpp"
    model = Transformer(cfg, ops)
    gen = torch.Generator().manual_seed(offset)
    state = {name: torch.randn(p.shape, generator=gen) for name, p in model.named_parameters()}
    load_weights(model, state, torch.float32, torch.device("cpu"))
    ids = torch.randint(0, 50, (9, 1), generator=gen)
    at = torch.tensor([0, 3, 0, 7, 1, 61, 2, 0, 5])  # rows at their own positions, some at 0
    for side in ("src", "tgt"):
        native = model._embed(model.src_embed, ids, side, at, 62)
        model.ops = dataclasses.replace(ops, embed_rows=None)
        try:
            aten = model._embed(model.src_embed, ids, side, at, 62)
        finally:
            model.ops = ops
        assert torch.equal(native, aten), side
        assert not torch.equal(native[1], native[3])  # (tokens at positions 3 and 7: the rows were embedded)


def test_a_layer_of_mixed_weight_types_is_refused():
    """Every linear of a layer has one weight type (the step's kernel names one of them): a mix is a named error."""
    w = torch.randn(64, 32)
    bf16 = _C.Bf16Weight(_C.bf16_pack(w), None, 64)
    norms = [torch.ones(32), torch.zeros(32)] * 3
    with pytest.raises(RuntimeError, match="one weight type"):
        _C.DecoderLayer(bf16, bf16, bf16, bf16, bf16, _C.Int8Weight(*_C.int8_pack(w.to(torch.int8)), torch.ones(64),
                                                                     None, 64),
                        norms, 1e-5, False, "relu", 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_equals_indexed_assignment(dtype):
    """_C.write_kv (the encoder memory's write) against PyTorch's indexed assignment with its own rounding to bf16:
    every row's K and V at its slot and position, nothing else touched."""
    gen = torch.Generator().manual_seed(3)
    layers, slots, heads, width, head_dim, tokens = 3, 5, 4, 7, 16, 11
    kv = torch.randn(tokens, 2 * heads * head_dim, generator=gen)
    rows = torch.randint(0, slots, (tokens,), generator=gen)
    positions = torch.randperm(slots * width, generator=gen)[:tokens] % width  # (row, position) pairs may repeat
    pairs = sorted({(int(r), int(p)) for r, p in zip(rows, positions)})
    keep = [next(i for i in range(tokens) if (int(rows[i]), int(positions[i])) == pair) for pair in pairs]
    kv, rows, positions = kv[keep], rows[keep], positions[keep]  # one writer per place: the result is defined
    memory = torch.randn(layers, 2, slots, heads, width, head_dim, generator=gen).to(dtype)
    expected = memory.clone()
    expected[1][:, rows, :, positions] = kv.view(-1, 2, heads, head_dim).to(dtype)
    _C.write_kv(kv, memory, 1, rows, positions)
    assert torch.equal(memory, expected)


def test_write_kv_refuses_bad_arguments():
    memory = torch.zeros(2, 2, 3, 2, 4, 8)
    kv = torch.randn(2, 32)
    with pytest.raises(RuntimeError, match="row 3 outside"):
        _C.write_kv(kv, memory, 0, torch.tensor([0, 3]), torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="position 4 outside"):
        _C.write_kv(kv, memory, 0, torch.tensor([0, 1]), torch.tensor([4, 1]))
    with pytest.raises(RuntimeError, match="layer 2 outside"):
        _C.write_kv(kv, memory, 2, torch.tensor([0, 1]), torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="kv must be"):
        _C.write_kv(kv[:, :16], memory, 0, torch.tensor([0, 1]), torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="one row and one position"):
        _C.write_kv(kv, memory, 0, torch.tensor([0]), torch.tensor([0, 1]))
