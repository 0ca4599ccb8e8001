"""Marian's lexical shortlist: restrict the output layer to the target words a batch's source words can
translate to (`lex.*.s2t.bin`, as Bergamot's students ship them).

A sentence's output vocabulary is: the `first` most frequent target words, the words listed for each
distinct source word, and, while their count is not a multiple of eight, the lowest unlisted ids past
`first` (Marian pads so for its int8 GEMM; pyengine pads the same way so that it picks from the same
words). pyengine keeps one such list per sentence (as when each is translated alone): a batch's output
layer computes the union of its sentences' lists, and each row's logits outside its own list are -inf,
so a sentence's translation does not depend on its batch.
"""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from .errors import CheckpointError

MAGIC = 0xF11A48D5013417F5


class Shortlist:
    """Per source word, the target words it may translate to (CSR: offsets into one list)."""

    def __init__(self, offsets: np.ndarray, words: np.ndarray, first: int, best: int, vocab: int, shared: bool):
        self.offsets, self.words, self.first, self.best = offsets, words, first, best
        self.vocab, self.shared = vocab, shared

    @classmethod
    def read(cls, path: Path, vocab: int, shared: bool = False) -> "Shortlist":
        """A binary shortlist: magic, checksum, first, best, offsets count, list length, offsets, lists."""
        try:
            buf = path.read_bytes()
            magic, _checksum, first, best, n_offsets, n_words = struct.unpack_from("<6Q", buf, 0)
        except (OSError, struct.error) as exc:
            raise CheckpointError(f"{path}: cannot read the shortlist ({exc})") from None
        if magic != MAGIC:
            raise CheckpointError(f"{path}: not a binary Marian shortlist (magic {magic:#x})")
        if len(buf) != 48 + 8 * n_offsets + 4 * n_words:
            raise CheckpointError(f"{path}: {len(buf)} bytes, the header implies {48 + 8 * n_offsets + 4 * n_words}")
        offsets = np.frombuffer(buf, dtype=np.uint64, count=n_offsets, offset=48).astype(np.int64)
        words = np.frombuffer(buf, dtype=np.uint32, count=n_words, offset=48 + 8 * n_offsets).astype(np.int64)
        if n_offsets < 2 or offsets[-1] != n_words or (words >= vocab).any():
            raise CheckpointError(f"{path}: offsets or word ids do not fit a vocabulary of {vocab}")
        return cls(offsets, words, int(first), int(best), vocab, shared)

    def allowed(self, sources: list[list[int]], device: torch.device | str = "cpu") -> torch.Tensor:
        """(B, V) bool: the target words each source sentence may produce."""
        return torch.from_numpy(np.stack([self.selected(s) for s in sources])).to(device)

    def indices(self, source_ids: Iterable[int], device: torch.device | str = "cpu") -> torch.Tensor:
        """The sorted target ids kept for these source ids (one sentence, or a batch taken as one)."""
        return torch.from_numpy(np.flatnonzero(self.selected(source_ids))).to(device)

    def selected(self, source_ids: Iterable[int]) -> np.ndarray:
        """(V,) bool: the words listed for these source ids, padded to a multiple of eight."""
        selected = np.zeros(self.vocab, dtype=bool)
        selected[: self.first] = True
        for word in set(int(w) for w in source_ids):
            if self.shared:
                selected[word] = True
            if word + 1 < len(self.offsets):
                selected[self.words[self.offsets[word]: self.offsets[word + 1]]] = True
        missing = (-int(selected.sum())) % 8
        if missing:
            free = np.flatnonzero(~selected[self.first:])[:missing] + self.first
            selected[free] = True
        return selected
