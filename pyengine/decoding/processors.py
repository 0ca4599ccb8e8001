"""Logits processors (HF's, in HF's order) and candidate selection: what a search strategy applies to a step's
logits, and which of the processors an output layer fused with log-softmax + top-k can take as bans."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .. import _C
from ..config import DecodeOptions

if TYPE_CHECKING:
    from ..model.backends import LogSoftmaxTopk
    from ..model.cache import BufferPool

NEG = -1.0e9  # HF's "excluded" score


def needs_history(opts: DecodeOptions) -> bool:
    """Whether the processors look at the tokens generated so far."""
    return opts.repetition_penalty != 1.0 or opts.no_repeat_ngram_size > 0 or bool(opts.suppress_sequences)


def penalize_repetitions(scores: torch.Tensor, seqs: torch.Tensor, penalty: float) -> None:
    """HF's RepetitionPenaltyLogitsProcessor: every token of the row's sequence, × penalty if < 0, ÷ if > 0."""
    seen = scores.gather(1, seqs)
    scores.scatter_(1, seqs, torch.where(seen < 0, seen * penalty, seen / penalty))


def ban_repeated_ngrams(scores: torch.Tensor, seqs: torch.Tensor, n: int) -> None:
    """HF's NoRepeatNGramLogitsProcessor: ban each token that would complete an n-gram already in the row."""
    length, vocab = seqs.shape[1], scores.shape[1]
    if length < n:
        return
    windows = seqs.unfold(1, n, 1)  # (N, W, n)
    prefix = seqs[:, length + 1 - n:]  # the last n-1 tokens
    matches = (windows[..., :-1] == prefix[:, None, :]).all(dim=-1)
    banned = torch.zeros(scores.shape[0], vocab + 1, dtype=torch.bool, device=scores.device)
    banned.scatter_(1, torch.where(matches, windows[..., -1], vocab), True)  # non-matches land in a spare column
    scores.masked_fill_(banned[:, :vocab], float("-inf"))


def ban_sequences(scores: torch.Tensor, seqs: torch.Tensor, sequences: tuple[tuple[int, ...], ...]) -> None:
    """CTranslate2's suppress_sequences: the last token of each sequence is banned where a row's tokens end with
    the rest of it (a one-token sequence is always banned)."""
    for seq in sequences:
        *head, last = seq
        if not head:
            scores[:, last] = float("-inf")
        elif seqs.shape[1] >= len(head):
            ends = (seqs[:, seqs.shape[1] - len(head):] == torch.tensor(head, device=seqs.device)).all(dim=1)
            scores[ends, last] = float("-inf")


def apply_processors(scores: torch.Tensor, step: int, opts: DecodeOptions, eos: int,
                     seqs: torch.Tensor | None = None) -> torch.Tensor:
    """HF's logits processors for these options, in HF's order, in place on (N, V) logits or log-probs at
    generated index `step`. seqs (N, step + 1): each row's decoder tokens so far, start token included."""
    if opts.repetition_penalty != 1.0:
        penalize_repetitions(scores, seqs, opts.repetition_penalty)
    if opts.no_repeat_ngram_size > 0:
        ban_repeated_ngrams(scores, seqs, opts.no_repeat_ngram_size)
    if opts.suppress_sequences:
        ban_sequences(scores, seqs, opts.suppress_sequences)
    if opts.suppress_tokens:
        scores[:, list(opts.suppress_tokens)] = float("-inf")
    if step < opts.min_decoding_length:
        scores[:, list(opts.end_ids(eos))] = float("-inf")
    if opts.forced_bos_token is not None and step == 0:
        scores.fill_(float("-inf"))
        scores[:, opts.forced_bos_token] = 0.0
    if opts.forced_eos and step == opts.max_decoding_length - 1:
        scores.fill_(float("-inf"))
        scores[:, eos] = 0.0
    return scores


def topk_rows(x: torch.Tensor, k: int, chunk: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(x, k, dim=-1) for (N, V) rows with V ≫ k, computed in two cheap passes.

    The k largest values of a row lie in the k chunks with the largest maxima (each of those values
    is some chunk's max or below it, and at most k chunks have a max that large), so a max per chunk,
    a top-k over chunk maxima and a top-k over the k·chunk gathered values give the exact result
    (equal values may come in another order). On CPU this is ~5× torch.topk over a 58k vocabulary.
    """
    n, v = x.shape
    chunks = v // chunk
    if chunks < 4 * k:
        return torch.topk(x, k, dim=-1)
    body = x[:, : chunks * chunk].view(n, chunks, chunk)
    best_chunks = torch.topk(body.amax(dim=-1), k, dim=-1).indices  # (N, k)
    cand = body.gather(1, best_chunks[:, :, None].expand(n, k, chunk)).view(n, k * chunk)
    cand_ids = (best_chunks[:, :, None] * chunk + torch.arange(chunk, device=x.device)).view(n, k * chunk)
    if v > chunks * chunk:  # the ragged tail is always a candidate
        cand = torch.cat([cand, x[:, chunks * chunk:]], dim=1)
        tail_ids = torch.arange(chunks * chunk, v, device=x.device).expand(n, v - chunks * chunk)
        cand_ids = torch.cat([cand_ids, tail_ids], dim=1)
    values, pos = torch.topk(cand, k, dim=-1)
    return values, cand_ids.gather(1, pos)


def ending(tokens: torch.Tensor, opts: DecodeOptions, eos: int) -> torch.Tensor:
    """Which of these tokens end a hypothesis (the model's `eos`, or end_token's one or several ids)."""
    ends = opts.end_ids(eos)
    return tokens == ends[0] if len(ends) == 1 else torch.isin(tokens, torch.tensor(ends, device=tokens.device))


def record_choice(logp: torch.Tensor, ids: torch.Tensor, scores: torch.Tensor, history: torch.Tensor, step: int,
                  opts: DecodeOptions, eos: int, loop: bool) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """A greedy step's bookkeeping: each row's chosen token (ids (N, k)'s column 0) and its log-prob (logp's) into
    `scores` and `history` (column `step`) in place → (the tokens, which rows end, whether any does). loop: one C++
    pass over CPU tensors (`_C.greedy_step`, the search ops' "loop", as the beam step's), else these ATen calls (any
    device), which at a decoder step run with their code cold (~8 of them)."""
    last = step + 1 >= opts.max_decoding_length  # (every row ends at the length limit)
    if loop:
        return _C.greedy_step(logp, ids, scores, history, step, opts.end_ids(eos), last)
    nxt = ids[:, 0]
    scores += logp[:, 0]
    history[:, step] = nxt
    done = ending(nxt, opts, eos)
    if last:
        done.fill_(True)
    return nxt, done, bool(done.any())


def fused_bans(step: int, opts: DecodeOptions, eos: int) -> list[int] | None:
    """The token ids the processors exclude at this step when excluding is all they do, for the fused
    C++ log-softmax + top-k; None when a processor changes scores or looks at each row's history
    (repetition penalty, n-gram ban, forced tokens), which take the unfused path."""
    if needs_history(opts):
        return None
    if (opts.forced_bos_token is not None and step == 0) or \
            (opts.forced_eos and step == opts.max_decoding_length - 1):
        return None
    return list(opts.suppress_tokens) + (list(opts.end_ids(eos)) if step < opts.min_decoding_length else [])


def candidates(logits: torch.Tensor, k: int, step: int, opts: DecodeOptions, eos: int, buffers: "StepBuffers",
               seqs: torch.Tensor | None, topk: LogSoftmaxTopk,
               on_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's k best (log-prob after the processors, token) from (N, V) logits, best first.

    Fused (`topk`, the engine's log-softmax + top-k: C++ on the CPU, Triton on a GPU; one pass over each row, no
    (N, V) log-prob tensor written) unless a processor needs the full matrix, or the processors apply to the logits
    (`on_logits`, see log_probs) and ban something this step. Consumes `logits`."""
    bans = fused_bans(step, opts, eos)
    if bans is None or (on_logits and bans):
        return topk_rows(log_probs(logits, step, opts, eos, out=buffers.logp(logits.shape[0]), seqs=seqs,
                                   on_logits=on_logits), k)
    return topk(logits.contiguous(), k, bans)


def log_probs(logits: torch.Tensor, step: int, opts: DecodeOptions, eos: int,
              out: torch.Tensor | None = None, seqs: torch.Tensor | None = None, on_logits: bool = False) -> torch.Tensor:
    """processors(log_softmax(logits)), HF's beam-search scores for the next token (into `out` if given); with
    `on_logits`, log_softmax(processors(logits)), CTranslate2's: a disabled token leaves the softmax."""
    if on_logits:
        logits = apply_processors(logits, step, opts, eos, seqs)
    logp = torch.log_softmax(logits, dim=-1) if out is None else \
        torch.ops.aten._log_softmax.out(logits, -1, False, out=out)
    return logp if on_logits else apply_processors(logp, step, opts, eos, seqs)


class PrefixBias:
    """CTranslate2's prefix_bias_beta (Arivazhagan et al. 2020, "Re-translation versus streaming"): the target prefix
    is not forced; while a row has followed it, its next-token distribution is (1 - β)·p + β on the prefix's next
    token, p the softmax of the processed logits. A row leaves the prefix for good when it takes another token (the
    scores add the biased log-probs, as CTranslate2's). Beam rows inherit their parent's state."""

    def __init__(self, prefix: torch.Tensor, beta: float, beam: int):
        self.prefix = prefix.repeat_interleave(beam, dim=0)  # (rows, P)
        self.beta, self.length = beta, prefix.shape[1]
        self.on = torch.ones(self.prefix.shape[0], dtype=torch.bool, device=prefix.device)

    def active(self, step: int) -> bool:
        """Whether this step may bias a row (no read from the device: rows that left still take the full path)."""
        return step < self.length

    def apply(self, logp: torch.Tensor, step: int) -> None:
        """(rows, V) processed log-probs → the biased ones, in place, for the rows still on their prefix."""
        biased = torch.softmax(logp, dim=-1).mul_(1 - self.beta)
        biased.scatter_add_(1, self.prefix[:, step:step + 1],
                            torch.full((logp.shape[0], 1), self.beta, device=logp.device))
        torch.where(self.on[:, None], biased.log_(), logp, out=logp)

    def follow(self, parents: torch.Tensor | None, tokens: torch.Tensor, step: int) -> None:
        """The rows after this step: each from its parent row (None: the same rows), having taken `tokens`."""
        on, prefix = (self.on, self.prefix) if parents is None else (self.on[parents], self.prefix[parents])
        self.prefix = prefix
        self.on = on & (tokens == prefix[:, step]) if step < self.length else torch.zeros_like(on)

    def keep(self, rows: torch.Tensor) -> None:
        self.on, self.prefix = self.on[rows], self.prefix[rows]


class StepBuffers:
    """The per-step (rows, V) float32 tensors, allocated once per search: fresh 30 MB tensors every step
    cost more in page faults than the log-softmax that fills them. `pool` (a model's BufferPool): taken from it
    where the one it holds has the rows, and given back to it by `give`."""

    def __init__(self, rows: int, vocab: int, device: torch.device, pool: "BufferPool | None" = None):
        logits, logp = (None, None) if pool is None else (pool.take("step-logits"), pool.take("step-logp"))
        fits = logits is not None and logp is not None and logits.shape[0] >= rows and logits.shape[2] == vocab
        self._logits = logits if fits else torch.empty(rows, 1, vocab, device=device)
        self._logp = logp if fits else torch.empty(rows, vocab, device=device)

    @property
    def capacity(self) -> int:
        return self._logits.shape[0]

    def logits(self, rows: int) -> torch.Tensor:
        return self._logits[:rows]

    def logp(self, rows: int) -> torch.Tensor:
        return self._logp[:rows]

    @property
    def vocab(self) -> int:
        return self._logp.shape[1]

    def give(self, pool: "BufferPool") -> None:
        pool.give("step-logits", self._logits)
        pool.give("step-logp", self._logp)


def sample_tokens(scores: torch.Tensor, opts: DecodeOptions, generator: torch.Generator) -> torch.Tensor:
    """One token per row from processed scores: temperature, then top-k, then top-p (HF's warper order)."""
    return torch.multinomial(warped(scores, opts).softmax(dim=-1), 1, generator=generator)[:, 0]


def warped(scores: torch.Tensor, opts: DecodeOptions) -> torch.Tensor:
    """HF's sampling warpers on processed scores, in its order: temperature, then top-k, then top-p (filtered: -inf)."""
    scores = scores / opts.sampling_temperature
    if opts.sampling_topk > 1:
        kth = topk_rows(scores, min(opts.sampling_topk, scores.shape[-1]))[0][:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if opts.sampling_topp < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        # drop a token once the tokens before it already reach p (the best one always stays)
        drop = (cumulative - sorted_scores.softmax(dim=-1)) >= opts.sampling_topp
        drop[:, 0] = False  # also when p is below float32's smallest number (then 0 >= p holds for the first)
        scores = scores.scatter(1, order, sorted_scores.masked_fill(drop, float("-inf")))
    return scores


def accumulated(scores: torch.Tensor, run_scores: torch.Tensor) -> torch.Tensor:
    """Each sentence's running score + the score of every (beam, candidate): (B·K, C) scores of its rows and the
    (B, K) running scores → (B, K·C), beam-major (position // C is the beam)."""
    b, k = run_scores.shape
    return (scores.view(b, k, -1) + run_scores[:, :, None]).view(b, -1)


def sampled_candidates(scores: torch.Tensor, run_scores: torch.Tensor, n: int,
                       generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's beam-search sampling (do_sample with num_beams): per sentence, n continuations drawn without replacement
    from softmax(running score + warped score) over its beams × vocabulary. Returned as each row's candidates
    ((B·K, n) scores and ids, -inf where a row has fewer), so a beam step that keeps a sentence's n best of running
    score + candidate score keeps exactly these."""
    b, k = run_scores.shape
    v = scores.shape[-1]
    drawn = torch.multinomial(accumulated(scores, run_scores).softmax(dim=-1), n, generator=generator)  # no replacement
    cand = torch.full((b * k, n), float("-inf"), device=scores.device)
    ids = torch.zeros((b * k, n), dtype=torch.long, device=scores.device)
    used = [0] * (b * k)
    for sentence, picks in enumerate(drawn.tolist()):
        for flat in picks:
            row, token = sentence * k + flat // v, flat % v
            cand[row, used[row]], ids[row, used[row]] = scores[row, token], token
            used[row] += 1
    return cand, ids


def ct2_drawn_candidates(logp: torch.Tensor, run_scores: torch.Tensor, opts: DecodeOptions, n: int,
                         generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CTranslate2's beam sampling (its RandomSampler asked for n > 1 samples, src/sampling.cc 4.x): over each
    sentence's running score + log-prob of every beam × token, the `sampling_topk` best (0: all), times 1/temperature,
    CTranslate2's top-p mask, log-softmax; plus noise −log(U), U uniform in (FLT_MIN, 1) — exponential noise, which its
    code calls the Gumbel-max trick (Gumbel noise would be −log(−log U); CTranslate2 4.8.5's draws follow the
    exponential, measured) — and the n largest, in that order. Returns (B, n) running scores (untempered), parent beams
    and tokens in draw order: CTranslate2's beam rule takes the first `beam` of them, not the best."""
    v = logp.shape[-1]
    total = accumulated(logp, run_scores)
    x, flat = total, None
    if 0 < opts.sampling_topk < total.shape[-1]:
        x, flat = topk_rows(total, opts.sampling_topk)
    if opts.sampling_temperature != 1:
        x = x * (1.0 / opts.sampling_temperature)
    if opts.sampling_topp < 1.0:  # keep tokens while the mass before them is below p (the best one always)
        probs, order = torch.sort(x.softmax(dim=-1), descending=True, dim=-1)
        drop = (probs.cumsum(dim=-1) - probs) >= opts.sampling_topp
        x = x.scatter(1, order, x.gather(1, order).masked_fill(drop, float("-inf")))
    u = torch.rand(x.shape, generator=generator, device=x.device).clamp_(min=torch.finfo(torch.float32).tiny)
    drawn = (torch.log_softmax(x, dim=-1) - torch.log(u)).topk(min(n, x.shape[-1]), dim=-1).indices
    if flat is not None:
        drawn = flat.gather(1, drawn)
    return total.gather(1, drawn), torch.div(drawn, v, rounding_mode="floor"), drawn % v


def forced_eos_candidates(rows: int, k: int, vocab: int, eos: int,
                          device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The k candidates of each row at HF's forced-EOS step (forced_eos, the last step): the processor overwrites
    every score, EOS 0 and the rest -inf, whatever the logits (log-softmax before or after it), so no output layer
    is needed; the -inf ones are the ones topk_rows takes from those scores, as on the full path."""
    row = torch.full((1, vocab), float("-inf"), device=device)
    row[0, eos] = 0.0
    values, ids = topk_rows(row, k)
    return values.repeat(rows, 1), ids.repeat(rows, 1)


def forced_final_eos(logits: torch.Tensor, eos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fairseq's last step: EOS is the only candidate, with its real log-probability (its logit less the row's
    log-sum-exp: no (rows, V) log-softmax written for one column)."""
    logits = logits.float()
    logp = logits[:, eos:eos + 1] - torch.logsumexp(logits, dim=-1, keepdim=True)
    return logp, torch.full_like(logp, eos, dtype=torch.long)


