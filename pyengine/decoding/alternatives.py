"""CTranslate2's return_alternatives: several translations that part at the first position after the target prefix.

At that position (the first one when there is no prefix) the `num_hypotheses` most likely tokens are taken — log-probs
after the logits processors, the end token excluded (CTranslate2 expands them with a minimum length of 1), those below
`min_alternative_expansion_prob` dropped — and each is continued on its own by the options' search (greedy or beam),
the prefix and the token forced. A hypothesis is the prefix, its token and the continuation; its score is the token's
log-prob plus the continuation's score. The lengths count from the first token after the start token, prefix included,
as CTranslate2's do in this mode.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ..config import DecodeOptions
from ..model import ForcedDecoder
from .hypothesis import Hypothesis
from .processors import apply_processors

if TYPE_CHECKING:
    from ..engine import Engine


def next_tokens(engine: "Engine", ids: list[list[int]], prefixes: list[list[int]],
                opts: DecodeOptions) -> list[list[tuple[int, float]]]:
    """Per sentence, the (token, log-prob) alternatives at the position after its prefix, best first."""
    cfg, device = engine.config, engine.engine_config.device
    end = opts.end_ids(cfg.eos_id)[0]
    floor = math.log(opts.min_alternative_expansion_prob) if opts.min_alternative_expansion_prob > 0 else float("-inf")
    out = []
    for src_ids, prefix in zip(ids, prefixes):  # one teacher-forced pass each: alternatives are few and short
        src = torch.tensor([src_ids], device=device)
        prompt = torch.tensor([[cfg.decoder_start_id] + prefix], device=device)
        logits = ForcedDecoder(engine.model, src, torch.tensor([len(src_ids)], device=device),
                               prompt.shape[1] + 1).logits(prompt)[:, -1].float()
        logp = torch.log_softmax(logits, dim=-1)
        apply_processors(logp, len(prefix), opts.replace(min_decoding_length=len(prefix) + 1, forced_eos=False,
                                                         forced_bos_token=None), end, prompt)
        values, tokens = torch.topk(logp[0], opts.num_hypotheses)
        out.append([(t, v) for t, v in zip(tokens.tolist(), values.tolist())
                    if v > float("-inf") and v >= floor])
    return out


def alternatives(engine: "Engine", ids: list[list[int]], opts: DecodeOptions,
                 prefixes: list[list[int]] | None) -> list[list[Hypothesis]]:
    """Each sentence's alternatives (see the module docstring), in the order of their first token's log-prob."""
    lead = [] if opts.forced_bos_token is None else [opts.forced_bos_token]  # a target language leads the prefix
    prefixes = [lead + p for p in (prefixes or [[] for _ in ids])]
    opts = opts.replace(forced_bos_token=None)
    choices = next_tokens(engine, ids, prefixes, opts)
    results: list[list[Hypothesis]] = [[] for _ in ids]
    for length in sorted({len(p) for p in prefixes}):  # the continuation's limits count after prefix and token
        members = [(i, token, logp) for i, p in enumerate(prefixes) if len(p) == length for token, logp in choices[i]]
        left = opts.max_decoding_length - length - 1
        if not members:
            continue
        if left <= 0:
            for i, token, logp in members:
                results[i].append(Hypothesis(prefixes[i] + [token], logp))
            continue
        cont = opts.replace(return_alternatives=False, num_hypotheses=1, max_decoding_length=left,
                            min_decoding_length=max(0, min(left, opts.min_decoding_length - length - 1)))
        outs = engine._generate([ids[i] for i, _, _ in members], cont,
                                prefixes=[prefixes[i] + [token] for i, token, _ in members])
        for (i, token, logp), hyps in zip(members, outs):
            results[i].append(Hypothesis(hyps[0].tokens, logp + hyps[0].score))
    return results
