"""The decoder prompt: the start token, then a sentence's forced target prefix (HF's decoder prompt), and how a
forced first token (a target language) joins it."""
from __future__ import annotations

import torch

from ..config import DecodeOptions


def decoder_prompt(start_id: int, prefix: torch.Tensor | None, rows: int, device: torch.device) -> torch.Tensor:
    """(rows, 1 + P): the start token, then the forced target prefix if any."""
    start = torch.full((rows, 1), start_id, dtype=torch.long, device=device)
    return start if prefix is None or prefix.shape[1] == 0 else torch.cat([start, prefix.to(device)], dim=1)


def prompt_options(opts: DecodeOptions, prefix_length: int) -> DecodeOptions:
    """The options of sentences with a target prefix of this length: a forced first token (a target language)
    then leads the prompt instead of being forced at the first step, as in HF."""
    return opts.replace(forced_bos_token=None) if prefix_length and opts.forced_bos_token is not None else opts


def prompt_prefix(opts: DecodeOptions, prefix: list[int]) -> list[int]:
    """The forced target tokens of a sentence with this prefix (see prompt_options)."""
    return [opts.forced_bos_token] + prefix if prefix and opts.forced_bos_token is not None else prefix
