"""Decoder steps and encoder stacks: how a step runs the decoder layers and how a cohort's sources run the encoder
layers, one implementation of each chosen per engine at load.

`LayerStep` runs the layers in Python, each operation through the model's Ops (any backend, dtype and decoder
kind: the reference the native steps are tested against). `CppStep` runs every layer in one C++ call on
pyengine's own int8 or bf16 GEMM (csrc/decoder_step.cpp): the same operations in the same order, equal to the bit.
Both take rows at different positions (cohorts of a continuous batch) through the KV cache's row index.
`LayerStack` and `CppStack` are the encoder's two: its layers in Python, or in one C++ call (csrc/encoder_stack.cpp).
"""
from __future__ import annotations

from typing import Protocol

import torch

from .. import _C
from .backends import CPP_ATTENTION_KEYS, torch_add_layer_norm
from .cache import KVCache, RecurrentCache
from .f32_linear import F32Linear
from .linear import Bf16Linear, FloatLinear, Int8Linear
from .memory import Memory


class DecoderStep(Protocol):
    name: str

    def __call__(self, model, x: torch.Tensor, cache: KVCache | RecurrentCache, memory: Memory,
                 attention_out: list | None = None) -> torch.Tensor:
        """x (N, T, D) embedded tokens at the positions of cache.begin_step → the last layer's output (N, T, D)."""


class LayerStep:
    """The decoder layers in Python (see the module docstring)."""

    name = "python-layers"

    def __call__(self, model, x: torch.Tensor, cache: KVCache | RecurrentCache, memory: Memory,
                 attention_out: list | None = None) -> torch.Tensor:
        last = len(model.decoder_layers) - 1
        for i, layer in enumerate(model.decoder_layers):
            x = layer(x, i, cache, memory, model.ops, attention_out if i == last else None)
        return x


class CppStep:
    """Every decoder layer of one step in one C++ call (`_C.decoder_step`), on the int8 or bf16 weights of
    pyengine's own GEMMs or float32 ones (FloatLinear's operations, its layer norms PyTorch's where the model's Ops
    use them): no Python call per operation (int8, batch 1 decode 100 -> ~50-75 ms, batch 32 greedy 258 -> 230 ms when
    it was introduced). Blocks of several tokens per row and steps that must return the
    cross-attention weights run the Python layers, which compute the same operations (tested equal to the bit)."""

    def __init__(self, model, kind: str, kernel: str) -> None:
        self.name, self.kernel = f"cpp-{kind}", kernel
        self.layers = [_C.DecoderLayer(
            *native_weights(kind, l.self_attn.qkv, l.self_attn.out, l.cross_attn.q, l.cross_attn.out, l.ffn.fc1,
                            l.ffn.fc2),
            norm_tensors(l.self_attn_norm, l.cross_attn_norm, l.ffn_norm),
            l.self_attn_norm.eps, l.pre_norm, l.ffn.activation, l.self_attn.heads,
            aten_norm=model.ops.add_layer_norm is torch_add_layer_norm) for l in model.decoder_layers]
        self.layer_step = LayerStep()

    def __call__(self, model, x: torch.Tensor, cache: KVCache, memory: Memory,
                 attention_out: list | None = None) -> torch.Tensor:
        n, t, d = x.shape
        if t != 1 or attention_out is not None:
            return self.layer_step(model, x, cache, memory, attention_out)
        w = memory.width
        _, rows, lengths = memory.step_view()  # a row per sentence (its beams fold into it), or per decoder row
        out = _C.decoder_step(self.layers, x.view(n, d), cache.physical, cache.positions, cache.write_rows,
                              cache.rows_index, memory.kv[:, :, :, :, :w], rows, lengths, kernel=self.kernel)
        return out.view(n, 1, d)


class LayerStack:
    """The encoder layers in Python (the reference CppStack is tested against)."""

    name = "python-layers"

    def __call__(self, model, x: torch.Tensor, ragged) -> torch.Tensor:
        for layer in model.encoder_layers:
            x = layer(x, ragged, model.ops)
        return x


class CppStack:
    """Every encoder layer in one C++ call (`_C.encoder_stack`) on the int8, bf16 or float32 weights of pyengine's own
    GEMMs: the Python layers' operations in their order (their layer norm: PyTorch's for float32 models), equal to the
    bit, without their ~30 Python calls a layer (which a server's small cohorts paid about as much as for the
    arithmetic). Sources over CPP_ATTENTION_KEYS tokens run the
    Python layers, whose attention is PyTorch's there."""

    def __init__(self, model, kind: str, kernel: str) -> None:
        self.name, self.kernel = f"cpp-{kind}", kernel
        self.layers = [_C.EncoderLayer(
            *native_weights(kind, l.self_attn.qkv, l.self_attn.out, l.ffn.fc1, l.ffn.fc2),
            norm_tensors(l.self_attn_norm, l.ffn_norm),
            l.self_attn_norm.eps, l.pre_norm, l.ffn.activation, l.self_attn.heads,
            aten_norm=model.ops.add_layer_norm is torch_add_layer_norm) for l in model.encoder_layers]
        self.layer_stack = LayerStack()

    def __call__(self, model, x: torch.Tensor, ragged) -> torch.Tensor:
        if ragged.width > CPP_ATTENTION_KEYS or x.dtype != torch.float32:
            return self.layer_stack(model, x, ragged)
        return _C.encoder_stack(self.layers, x.contiguous(), ragged.lengths.tolist(), kernel=self.kernel)


def native_kind(model, step: bool = False) -> tuple[str, str] | None:
    """("int8", "bf16" or "f32", the kernel) where the model's linears are pyengine's own int8, bf16 or float32 GEMM
    (what the C++ step and stack run on); for the step (`step`), also ("float32", "auto") for PyTorch's float32 linears
    on the CPU (FloatLinear's operations, called from C++; bf16's too, without AVX-512); None otherwise."""
    linear = model.ops.linear
    if isinstance(linear, Int8Linear) and linear.own_kernel:
        return "int8", linear.kernel
    if isinstance(linear, Bf16Linear) and linear.kernel != "library":
        return "bf16", linear.kernel
    if isinstance(linear, F32Linear):
        return "f32", linear.kernel
    if isinstance(linear, Bf16Linear) and linear.library is not None:  # (no AVX-512: float32 on the rounded weight)
        linear = linear.library
    if step and type(linear) is FloatLinear and model.decoder_layers:
        weight = model.decoder_layers[0].ffn.fc1.packed.weight  # (every decoder layer has its feed-forward)
        if weight.dtype == torch.float32 and weight.device.type == "cpu":
            return "float32", "auto"
    return None


def native_weights(kind: str, *linears) -> list:
    """The linears' packed weights as the C++ layers take them (an Int8Weight as packed; a Bf16Weight or FloatWeight
    record)."""
    if kind == "int8":
        return [linear.packed for linear in linears]
    if kind == "f32":
        return [_C.F32Weight(l.packed.packed, l.packed.bias, l.packed.n) for l in linears]
    if kind == "float32":
        return [_C.FloatWeight(l.packed.weight, l.packed.onednn, l.packed.bias, l.packed.weight.shape[0])
                for l in linears]
    return [_C.Bf16Weight(linear.packed.packed, linear.packed.bias, linear.packed.n) for linear in linears]


def norm_tensors(*norms) -> list[torch.Tensor]:
    """Each layer norm's weight and bias, float32 and contiguous, in order (what the C++ layers take)."""
    return [t.float().contiguous() for n in norms for t in (n.weight, n.bias)]


def choose_encoder(model) -> LayerStack | CppStack:
    """The C++ stack where the model's linears are pyengine's own int8, bf16 or float32 GEMM (native_kind)."""
    native = native_kind(model)
    return LayerStack() if native is None else CppStack(model, *native)


def choose_step(model) -> DecoderStep:
    """The C++ step where the model's linears are pyengine's own int8 or bf16 GEMM or float32 on the CPU
    (native_kind) and its decoder layers self-attention; the Python layers otherwise."""
    if model.cfg.decoder_self != "attention":
        return LayerStep()
    native = native_kind(model, step=True)
    if native is None:
        return LayerStep()
    return CppStep(model, *native)
