"""Reference implementations the engine's native and fused paths are tested against, written apart from them:
the HF beam step in Python (the specification of pyengine._C.beam_step), and a whole beam search that
recomputes the decoder over every beam's full prefix at each step (no KV cache, no row reordering, no fused
log-softmax + top-k, no C++ step)."""
from __future__ import annotations

import torch

from pyengine.config import DecodeOptions
from pyengine.decoding.processors import NEG
from pyengine.decoding.hf_beam import HFBeamState
from pyengine.model import ForcedDecoder


def best_first(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's k best (values, indices), best first; equal values in index order (the beam step's tie rule)."""
    values, indices = torch.sort(x, dim=-1, descending=True, stable=True)
    return values[..., :k], indices[..., :k]


def hf_beam_step(state: HFBeamState, cand_logp: torch.Tensor, cand_ids: torch.Tensor, step: int,
                 opts: DecodeOptions, eos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's beam rule as HFBeamState.step applies it (in C++), updating the state in place. With n end ids (the
    options' end_token, else `eos`) it ranks C = max(2, 1 + n) × beam candidates per sentence (HF's beams_to_keep);
    those are among its rows' own best C each."""
    b, k = state.run_scores.shape
    ends = torch.tensor(opts.end_ids(eos))
    c = max(2, 1 + len(ends)) * k
    per_row = cand_logp.shape[-1]
    acc = (cand_logp.view(b, k, per_row) + state.run_scores[:, :, None]).view(b, k * per_row)
    top_scores, top_pos = best_first(acc, c)  # (B, C)
    parent = torch.div(top_pos, per_row, rounding_mode="floor")
    token = cand_ids.view(b, k * per_row).gather(1, top_pos)
    cand_hist = state.run_hist.gather(1, parent[:, :, None].expand(b, c, state.max_len)).clone()
    cand_hist[:, :, step] = token
    hits = torch.isin(token, ends) | (step + 1 >= state.max_len)

    # the best `beam` candidates that did not finish continue
    run_scores = top_scores + hits.float() * NEG
    keep = best_first(run_scores, k)[1]
    state.run_scores = run_scores.gather(1, keep)
    state.run_hist = cand_hist.gather(1, keep[:, :, None].expand(b, k, state.max_len))
    next_parent = parent.gather(1, keep)
    next_token = token.gather(1, keep)

    # finished candidates among the first `beam` compete for the finished set
    cand = top_scores / float((step + 1) ** opts.length_penalty)
    if opts.early_stopping is True:
        cand = cand + (state.fin_flag.all(dim=1, keepdim=True)).float() * NEG
    cand = cand + (~state.open[:, None]).float() * NEG
    first_k = torch.zeros(c, dtype=torch.bool, device=cand.device)
    first_k[:k] = True
    just_finished = hits & first_k[None, :]
    cand = cand + (~just_finished).float() * NEG
    merged_scores = torch.cat([state.fin_scores, cand], dim=1)
    pick = best_first(merged_scores, k)[1]
    state.last_parent, state.last_pick = parent, pick  # which beam each candidate extends; who is finished
    state.fin_scores = merged_scores.gather(1, pick)
    state.fin_hist = torch.cat([state.fin_hist, cand_hist], 1).gather(1, pick[:, :, None].expand(b, k, state.max_len))
    cand_len = torch.full((b, c), step + 1, dtype=torch.long, device=cand.device)
    state.fin_len = torch.cat([state.fin_len, cand_len], 1).gather(1, pick)
    state.fin_flag = torch.cat([state.fin_flag, just_finished], 1).gather(1, pick)

    # HF's heuristic: can the best running hypothesis still beat the worst finished one?
    if opts.early_stopping == "never" and opts.length_penalty > 0:
        best_len = state.max_len
    else:
        best_len = step + 1
    best_possible = state.run_scores[:, :1] / float(best_len ** opts.length_penalty)
    worst = torch.where(state.fin_flag, state.fin_scores.min(dim=1, keepdim=True).values, torch.tensor(NEG))
    state.open &= (best_possible > worst).any(dim=1)
    rows = (next_parent + torch.arange(b, device=cand.device)[:, None] * k).view(-1)
    return rows, next_token.view(-1)


def beam_search(model, src: list[int], opts: DecodeOptions, start: int, eos: int) -> list[tuple[list[int], float]]:
    """One sentence's n-best (tokens without EOS, score) by HF's rules: each step the decoder runs over every
    beam's whole prefix from scratch; log-softmax, suppressed tokens, forced EOS and top-k in plain PyTorch."""
    k, max_len = opts.beam_size, opts.max_decoding_length
    state = HFBeamState(1, k, max_len, torch.device("cpu"), "loop")
    x = torch.tensor([src])
    for step in range(max_len):
        prefix = torch.cat([torch.full((k, 1), start), state.run_hist[0, :, :step]], dim=1)
        with torch.inference_mode():
            logits = ForcedDecoder(model, x, torch.tensor([len(src)]), step + 1, beam=k).logits(prefix)[:, -1]
        logp = torch.log_softmax(logits.double(), dim=-1).float()
        if opts.suppress_tokens:
            logp[:, list(opts.suppress_tokens)] = float("-inf")
        if step < opts.min_decoding_length:
            logp[:, eos] = float("-inf")
        if opts.forced_eos and step == max_len - 1:
            logp.fill_(float("-inf"))
            logp[:, eos] = 0.0
        cand_logp, cand_ids = torch.topk(logp, 2 * k, dim=-1)
        hf_beam_step(state, cand_logp, cand_ids, step, opts, eos)
        if bool(state.done(opts)[0]) or step + 1 == max_len:
            break
    return [(h.tokens, h.score) for h in state.results(torch.tensor([0]), opts, eos)[0][1]]
