"""The fused operations the model calls, resolved once per engine to one implementation.

`TorchOps` is the plain-PyTorch path (CPU, and the reference for every kernel). The Triton path
(`pyengine.kernels`) plugs in here with the same method signatures; `resolve_ops` picks one at
construction and reports which implementation each op uses, never falling back silently.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import BackendError

OP_NAMES = ("attention", "add_layer_norm", "linear_act")


def _activation(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "relu":
        return F.relu(x)
    if kind == "gelu":
        return F.gelu(x)  # HF "gelu" is the exact erf form
    if kind == "swish":
        return F.silu(x)
    raise ValueError(f"unknown activation {kind!r}")


class TorchOps:
    """PyTorch implementations; any device, any float dtype."""

    name = "torch"

    @staticmethod
    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lengths: torch.Tensor | None = None,
                  causal: bool = False) -> torch.Tensor:
        """softmax(q·kᵀ/√Dh)·v for q (B, H, Tq, Dh), k/v (B, H, Tk, Dh).

        kv_lengths (B,): keys at or past a row's length are padding. causal: query i sits at absolute
        position Tk - Tq + i and sees keys up to it (a block of new tokens after a cache).
        """
        tq, tk = q.shape[2], k.shape[2]
        mask = None
        if kv_lengths is not None:
            mask = (torch.arange(tk, device=q.device)[None, :] < kv_lengths[:, None])[:, None, None, :]
        if causal and tq > 1:
            causal_mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
            mask = causal_mask if mask is None else mask & causal_mask
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    @staticmethod
    def add_layer_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                       bias: torch.Tensor, eps: float) -> torch.Tensor:
        """LN(x + residual) (post-norm form); LN(x) when residual is None."""
        if residual is not None:
            x = x + residual
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps)

    @staticmethod
    def linear_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
        """activation(x·Wᵀ + b)."""
        return _activation(F.linear(x, weight, bias), activation)


def resolve_ops(backend: str, device: torch.device) -> tuple[object, dict[str, str]]:
    """Pick the op implementation for `backend` on `device`; report which implementation each op uses."""
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    if backend == "torch":
        return TorchOps(), {op: "torch" for op in OP_NAMES}
    if backend == "triton":
        raise BackendError("backend='triton' is not available in this build: the Triton kernels are not "
                           "installed (pyengine.kernels has no fused ops yet); use backend='torch'")
    raise BackendError(f"unknown backend {backend!r}; expected 'auto', 'torch' or 'triton'")
