"""Loading a model's weights: load → assign every parameter → pack for the chosen implementations (vLLM's
`process_weights_after_loading`): linear layers packed by the LinearMethod, the output layer built, the
decoder step and encoder stack chosen."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import CheckpointError
from .linear import Linear, LinearMethod, OutputLayer
from .pages import Placement, place_weights
from .step import choose_encoder, choose_step
from .transformer import POSITION_TABLES, Transformer


def load_weights(model: Transformer, state: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device,
                 huge_pages: bool = True) -> None:
    """Assign every parameter from `state` (our names); missing, extra or mis-shaped tensors are errors. Then
    pack the linear layers (on huge pages where asked and granted: pages.py) and choose the decoder step (the model
    is ready to decode)."""
    expected = dict(model.named_parameters())
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise CheckpointError(f"checkpoint does not match the model: missing {missing}, unexpected {extra}")
    for name, param in expected.items():
        tensor = state[name]
        if tuple(tensor.shape) != tuple(param.shape):
            raise CheckpointError(f"tensor {name!r} has shape {tuple(tensor.shape)}, "
                                  f"the config implies {tuple(param.shape)}")
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        setattr(module, leaf, nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False))
    cfg = model.cfg
    if cfg.positions in POSITION_TABLES:
        table = POSITION_TABLES[cfg.positions](cfg.max_positions + cfg.position_offset, cfg.d_model)
        model.register_buffer("sin_positions", table.to(device=device, dtype=dtype), persistent=False)
    method = model.ops.linear
    weight = (model.src_embed if model.tgt_embed is None else model.tgt_embed).weight if model.lm_head is None \
        else model.lm_head.weight
    model.output = OutputLayer(weight.detach(), model.final_logits_bias.detach() if cfg.final_logits_bias else None,
                               method)
    linears = [module for module in model.modules() if isinstance(module, Linear)]
    for module in linears:
        module.pack(method)
    model.weight_pages = Placement("off (huge_pages=False)") if not huge_pages else \
        Placement(f"default ({device.type})") if device.type != "cpu" else \
        place_weights(packed_records([*linears, model.output], method))
    model.step = choose_step(model)  # (after place_weights: the C++ layers hold the placed tensors)
    model.encoder_stack = choose_encoder(model)


def packed_records(holders: list, method: LinearMethod) -> list:
    """(packed tensor, rebind) of each holder (a Linear or the OutputLayer) whose record pyengine's own GEMMs read:
    rebind(tensor) gives the holder a record with that tensor in its place."""
    def rebind(holder):
        return lambda placed: setattr(holder, "packed", method.with_packed(holder.packed, placed))

    tensors = [(method.packed_tensor(h.packed), h) for h in holders]
    return [(tensor, rebind(h)) for tensor, h in tensors if tensor is not None]
