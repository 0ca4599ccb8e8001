"""Teacher forcing: the logits of given target tokens, fed through the same cache, memory and decoder step as
decoding (for scoring and for tests against a training library's teacher-forced forward)."""
from __future__ import annotations

import torch

from .cache import Span
from .transformer import Transformer


class ForcedDecoder:
    """Encodes src (B, S) once; each call feeds every row T more target tokens and returns their logits."""

    def __init__(self, model: Transformer, src: torch.Tensor, lengths: torch.Tensor, capacity: int, beam: int = 1):
        self.model, device = model, src.device
        self.memory = model.new_memory(device)
        model.remember([row[:n].tolist() for row, n in zip(src, lengths.tolist())], self.memory)
        self.rows = src.shape[0] * beam
        self.cache = model.new_cache(device)
        self.write_rows = torch.tensor(self.cache.reserve(self.rows, capacity), device=device)  # a fresh cache: 0..
        self.cache.append(self.rows)
        self.position = 0

    def hidden(self, tokens: torch.Tensor, attention_out: list | None = None) -> torch.Tensor:
        """tokens (N, T) at the next T positions → the decoder's output (N, T, D)."""
        self.cache.begin_step([Span(0, self.rows, self.position)], self.write_rows, tokens.shape[1], first_row=0)
        self.position += tokens.shape[1]
        return self.model.decoder_hidden(tokens, self.cache, self.memory, attention_out)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (N, T) at the next T positions → float32 logits (N, T, V)."""
        return self.model.logits(self.hidden(tokens), self.memory)
