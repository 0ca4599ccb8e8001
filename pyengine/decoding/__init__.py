"""Decoding: logits processors (processors), each family's beam rules (rules), greedy/beam step objects
(strategies), finished hypotheses (hypothesis) and the one decode loop over cohorts (runtime)."""
from .hypothesis import Hypothesis
from .rules import BeamRules, rules_for
from .runtime import Runtime, RuntimeStats, decode

__all__ = ["Hypothesis", "BeamRules", "rules_for", "Runtime", "RuntimeStats", "decode"]
