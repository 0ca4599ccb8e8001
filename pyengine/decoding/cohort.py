"""A cohort: the sentences admitted into a running batch together, with the search state they decode in."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .runs import join
from .strategies import Beam, Greedy


@dataclass
class Cohort:
    """Sentences admitted together: their strategy, the caller's tag and source length of each sentence, and
    the cache rows of each live sentence (its beams'), in the order of its batch rows."""

    strategy: Greedy | Beam
    tags: list[Any]
    lengths: list[int]
    slots: list[list[int]]
    rows_before: int = 0  # rows and sentences in the batch before the step (selections index them)
    sentences_before: int = 0

    def snapshot(self) -> None:
        self.rows_before, self.sentences_before = self.rows, self.sentences

    @property
    def rows(self) -> int:
        return self.strategy.rows

    @property
    def sentences(self) -> int:
        return self.strategy.sentences

    def absorb(self, other: "Cohort") -> None:
        """`other`'s sentences join this cohort's search state (runs.join), after its own."""
        join(self.strategy, other.strategy)
        self.tags += other.tags
        self.lengths += other.lengths
        self.slots += other.slots

    def keep(self, sentences: list[int]) -> list[int]:
        """Keep these sentences' cache rows (in this order); returns the rows of the others, now free."""
        kept = set(sentences)
        freed = [slot for i, rows in enumerate(self.slots) if i not in kept for slot in rows]
        self.slots = [self.slots[i] for i in sentences]
        return freed
