"""Symmetric per-row int8 quantization, shared by the int8 checkpoint format and the int8 linear layers."""
from __future__ import annotations

import torch


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale) with weight ≈ q · scale[:, None], q in [-127, 127], one float32 scale per row."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale
