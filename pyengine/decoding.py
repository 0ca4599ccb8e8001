"""The pieces of greedy and beam search: logits processors, candidate selection, beam states with the
rules of each checkpoint's library (pyengine/search.py drives them step by step).

Beam search keeps, per sentence, `beam` running hypotheses and a set of `beam` finished ones.
Each step scores 2×beam candidates over beam × vocab; candidates ending in EOS (or at the length
limit) among the first `beam` enter the finished set with score / length ** length_penalty;
the best non-finished `beam` continue. A sentence stops when no running hypothesis can beat its
worst finished one (HF's heuristic), and its rows are then dropped from the batch and the cache.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .config import DecodeOptions


NEG = -1.0e9  # HF's "excluded" score


StepCallback = Callable[[int, list[int], bool], None]  # (sentence, best tokens so far, finished)


@dataclass
class Hypothesis:
    tokens: list[int]  # generated ids without the start token and without EOS
    score: float
    attention: torch.Tensor | None = None  # (len(tokens), S): last layer's cross-attention, mean of heads


def finalize(hyps: list[Hypothesis], opts: DecodeOptions) -> list[Hypothesis]:
    """A finished sentence's n-best list. CTranslate2's coverage penalty is applied when it is ranked:
    score += β·Σ_j log(min(Σ_t a_tj, 1)) over the source positions j that received attention; then the
    attention is dropped unless it was asked for."""
    if opts.coverage_penalty:
        for h in hyps:
            coverage = h.attention.double().sum(dim=0)
            received = coverage[coverage > 0]
            h.score += float(opts.coverage_penalty * torch.log(received.clamp(max=1.0)).sum())
        hyps.sort(key=lambda h: -h.score)
    if not opts.return_attention:
        for h in hyps:
            h.attention = None
    return hyps


def needs_history(opts: DecodeOptions) -> bool:
    """Whether the processors look at the tokens generated so far."""
    return opts.repetition_penalty != 1.0 or opts.no_repeat_ngram_size > 0


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


def apply_processors(scores: torch.Tensor, step: int, opts: DecodeOptions, eos: int,
                     seqs: torch.Tensor | None = None) -> torch.Tensor:
    """HF's logits processors for these options, in HF's order, in place on (N, V) logits or log-probs at
    generated index `step`. seqs (N, step + 1): each row's decoder tokens so far, start token included."""
    if opts.repetition_penalty != 1.0:
        penalize_repetitions(scores, seqs, opts.repetition_penalty)
    if opts.no_repeat_ngram_size > 0:
        ban_repeated_ngrams(scores, seqs, opts.no_repeat_ngram_size)
    if opts.suppress_tokens:
        scores[:, list(opts.suppress_tokens)] = float("-inf")
    if step < opts.min_decoding_length:
        scores[:, eos] = float("-inf")
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


def fused_bans(step: int, opts: DecodeOptions, eos: int) -> list[int] | None:
    """The token ids the processors exclude at this step when excluding is all they do, for the fused
    C++ log-softmax + top-k; None when a processor changes scores or looks at each row's history
    (repetition penalty, n-gram ban, forced tokens), which take the unfused path."""
    if needs_history(opts):
        return None
    if (opts.forced_bos_token is not None and step == 0) or \
            (opts.forced_eos and step == opts.max_decoding_length - 1):
        return None
    return list(opts.suppress_tokens) + ([eos] if step < opts.min_decoding_length else [])


def candidates(logits: torch.Tensor, k: int, step: int, opts: DecodeOptions, eos: int, buffers: "StepBuffers",
               seqs: torch.Tensor | None, reference: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's k best (log-prob after HF's processors, token) from (N, V) logits, best first.

    Fused in C++ (one pass over each row, no (N, V) log-prob tensor written) unless a processor needs the
    full matrix; `reference` forces the unfused PyTorch path it replaces. Consumes `logits`."""
    bans = None if reference else fused_bans(step, opts, eos)
    if bans is None:
        return topk_rows(log_probs(logits, step, opts, eos, out=buffers.logp(logits.shape[0]), seqs=seqs), k)
    from . import _C
    return _C.log_softmax_topk(logits.contiguous(), k, torch.tensor(bans, dtype=torch.long))


def log_probs(logits: torch.Tensor, step: int, opts: DecodeOptions, eos: int,
              out: torch.Tensor | None = None, seqs: torch.Tensor | None = None) -> torch.Tensor:
    """processors(log_softmax(logits)), HF's beam-search scores for the next token (into `out` if given)."""
    logp = torch.log_softmax(logits, dim=-1) if out is None else \
        torch.ops.aten._log_softmax.out(logits, -1, False, out=out)
    return apply_processors(logp, step, opts, eos, seqs)


class StepBuffers:
    """The per-step (rows, V) float32 tensors, allocated once per search: fresh 30 MB tensors every step
    cost more in page faults than the log-softmax that fills them."""

    def __init__(self, rows: int, vocab: int, device: torch.device):
        self._logits = torch.empty(rows, 1, vocab, device=device)
        self._logp = torch.empty(rows, vocab, device=device)

    @property
    def capacity(self) -> int:
        return self._logits.shape[0]

    def logits(self, rows: int) -> torch.Tensor:
        return self._logits[:rows]

    def logp(self, rows: int) -> torch.Tensor:
        return self._logp[:rows]


def sample_tokens(scores: torch.Tensor, opts: DecodeOptions, generator: torch.Generator) -> torch.Tensor:
    """One token per row from processed scores: temperature, then top-k, then top-p (HF's warper order)."""
    scores = scores / opts.sampling_temperature
    if opts.sampling_topk > 1:
        kth = topk_rows(scores, min(opts.sampling_topk, scores.shape[-1]))[0][:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if opts.sampling_topp < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        # drop a token once the tokens before it already reach p (the best one always stays)
        drop = (cumulative - sorted_scores.softmax(dim=-1)) >= opts.sampling_topp
        scores = scores.scatter(1, order, sorted_scores.masked_fill(drop, float("-inf")))
    return torch.multinomial(scores.softmax(dim=-1), 1, generator=generator)[:, 0]



def decoder_prompt(start_id: int, prefix: torch.Tensor | None, rows: int, device: torch.device) -> torch.Tensor:
    """(rows, 1 + P): the start token, then the forced target prefix if any."""
    start = torch.full((rows, 1), start_id, dtype=torch.long, device=device)
    return start if prefix is None or prefix.shape[1] == 0 else torch.cat([start, prefix.to(device)], dim=1)


EARLY_STOPPING_CODES = {False: 0, True: 1, "never": 2}


class BeamState:
    """Per-sentence beam bookkeeping in batched tensors of shape (B, K, ...); B shrinks as sentences finish.

    `step` runs in C++ (pyengine._C.beam_step, ATen: CPU or CUDA tensors); `step_reference` is the same
    rule in Python, kept as the readable specification the C++ is tested against."""

    def __init__(self, batch: int, beam: int, max_len: int, device: torch.device, reference: bool = False):
        self.beam, self.max_len, self.reference = beam, max_len, reference
        self.sentence = torch.arange(batch, device=device)  # caller's index of each live sentence
        self.run_scores = torch.full((batch, beam), NEG, device=device)
        self.run_scores[:, 0] = 0.0  # only the first beam is live at the start
        self.run_hist = torch.zeros(batch, beam, max_len, dtype=torch.long, device=device)
        self.fin_scores = torch.full((batch, beam), NEG, device=device)
        self.fin_hist = torch.zeros(batch, beam, max_len, dtype=torch.long, device=device)
        self.fin_len = torch.zeros(batch, beam, dtype=torch.long, device=device)
        self.fin_flag = torch.zeros(batch, beam, dtype=torch.bool, device=device)
        self.open = torch.ones(batch, dtype=torch.bool, device=device)  # HF: early-stop heuristic unsatisfied

    def step(self, cand_logp: torch.Tensor, cand_ids: torch.Tensor, step: int, opts: DecodeOptions,
             eos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's best (log-prob, token) candidates → (parent row per new row (B·K,), next token (B·K,))."""
        if self.reference:
            return self.step_reference(cand_logp, cand_ids, step, opts, eos)
        from . import _C
        rows, nxt, self.last_parent, self.last_pick = _C.beam_step(
            cand_logp, cand_ids, self.run_scores, self.run_hist, self.fin_scores, self.fin_hist, self.fin_len,
            self.fin_flag, self.open, step, float(opts.length_penalty), EARLY_STOPPING_CODES[opts.early_stopping], eos)
        return rows, nxt

    def step_reference(self, cand_logp: torch.Tensor, cand_ids: torch.Tensor, step: int, opts: DecodeOptions,
                       eos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Python specification of `step`. The best 2K of a sentence over beam × vocab are among its rows'
        own best 2K each."""
        b, k = self.run_scores.shape
        per_row = cand_logp.shape[-1]
        acc = (cand_logp.view(b, k, per_row) + self.run_scores[:, :, None]).view(b, k * per_row)
        top_scores, top_pos = torch.topk(acc, 2 * k)  # (B, 2K)
        parent = torch.div(top_pos, per_row, rounding_mode="floor")
        token = cand_ids.view(b, k * per_row).gather(1, top_pos)
        cand_hist = self.run_hist.gather(1, parent[:, :, None].expand(b, 2 * k, self.max_len)).clone()
        cand_hist[:, :, step] = token
        hits = (token == eos) | (step + 1 >= self.max_len)

        # the best `beam` candidates that did not finish continue
        run_scores = top_scores + hits.float() * NEG
        keep = torch.topk(run_scores, k).indices
        self.run_scores = run_scores.gather(1, keep)
        self.run_hist = cand_hist.gather(1, keep[:, :, None].expand(b, k, self.max_len))
        next_parent = parent.gather(1, keep)
        next_token = token.gather(1, keep)

        # finished candidates among the first `beam` compete for the finished set
        cand = top_scores / float((step + 1) ** opts.length_penalty)
        if opts.early_stopping is True:
            cand = cand + (self.fin_flag.all(dim=1, keepdim=True)).float() * NEG
        cand = cand + (~self.open[:, None]).float() * NEG
        first_k = torch.zeros(2 * k, dtype=torch.bool, device=cand.device)
        first_k[:k] = True
        just_finished = hits & first_k[None, :]
        cand = cand + (~just_finished).float() * NEG
        merged_scores = torch.cat([self.fin_scores, cand], dim=1)
        pick = torch.topk(merged_scores, k).indices
        self.last_parent, self.last_pick = parent, pick  # which beam each candidate extends; who is finished
        self.fin_scores = merged_scores.gather(1, pick)
        self.fin_hist = torch.cat([self.fin_hist, cand_hist], 1).gather(1, pick[:, :, None].expand(b, k, self.max_len))
        cand_len = torch.full((b, 2 * k), step + 1, dtype=torch.long, device=cand.device)
        self.fin_len = torch.cat([self.fin_len, cand_len], 1).gather(1, pick)
        self.fin_flag = torch.cat([self.fin_flag, just_finished], 1).gather(1, pick)

        # HF's heuristic: can the best running hypothesis still beat the worst finished one?
        if opts.early_stopping == "never" and opts.length_penalty > 0:
            best_len = self.max_len
        else:
            best_len = step + 1
        best_possible = self.run_scores[:, :1] / float(best_len ** opts.length_penalty)
        worst = torch.where(self.fin_flag, self.fin_scores.min(dim=1, keepdim=True).values, torch.tensor(NEG))
        self.open &= (best_possible > worst).any(dim=1)
        rows = (next_parent + torch.arange(b, device=cand.device)[:, None] * k).view(-1)
        return rows, next_token.view(-1)

    def done(self, opts: DecodeOptions) -> torch.Tensor:
        """(B,) sentences whose finished set can no longer change."""
        full = self.fin_flag.all(dim=1) if opts.early_stopping is True else torch.zeros_like(self.open)
        return ~self.open | full

    def results(self, rows: torch.Tensor, opts: DecodeOptions, eos: int) -> list[tuple[int, list[Hypothesis]]]:
        out = []
        for r in rows.tolist():
            hyps = []
            for j in range(opts.num_hypotheses):
                n = int(self.fin_len[r, j])
                toks = self.fin_hist[r, j, :n].tolist()
                if toks and toks[-1] == eos:
                    toks = toks[:-1]
                hyps.append(Hypothesis(toks, float(self.fin_scores[r, j])))
            out.append((int(self.sentence[r]), hyps))
        return out

    def keep(self, rows: torch.Tensor) -> None:
        for name in ("sentence", "run_scores", "run_hist", "fin_scores", "fin_hist", "fin_len", "fin_flag", "open"):
            setattr(self, name, getattr(self, name).index_select(0, rows))


class RecordedBeamState:
    """Shared part of the beam states whose finished hypotheses are recorded in a list per sentence
    (OpenNMT-py's and fairseq's rules), same interface as BeamState. Only the first beam is live at the
    start; `step` is the library's rule."""

    def __init__(self, batch: int, beam: int, max_len: int, device: torch.device):
        self.beam, self.max_len = beam, max_len
        self.sentence = torch.arange(batch, device=device)
        self.run_scores = torch.full((batch, beam), float("-inf"), device=device)
        self.run_scores[:, 0] = 0.0
        self.run_hist = torch.zeros(batch, beam, max_len, dtype=torch.long, device=device)
        self.finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]  # per caller sentence
        self._done = torch.zeros(batch, dtype=torch.bool, device=device)

    def top_candidates(self, cand_logp: torch.Tensor, cand_ids: torch.Tensor,
                       n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The n best (running score + log-prob) over each sentence's beam × candidates:
        (scores (B, n), parent beam (B, n), token (B, n))."""
        b, k = self.run_scores.shape
        per_row = cand_logp.shape[-1]
        acc = (cand_logp.view(b, k, per_row) + self.run_scores[:, :, None]).view(b, k * per_row)
        top_scores, top_pos = torch.topk(acc, min(n, k * per_row))
        parent = torch.div(top_pos, per_row, rounding_mode="floor")
        return top_scores, parent, cand_ids.view(b, k * per_row).gather(1, top_pos)

    def advance(self, parent: torch.Tensor, token: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Continue beam j of each sentence from beam parent[:, j] with token[:, j]: (rows (B·K,), tokens (B·K,))."""
        b, k = parent.shape
        self.run_hist = self.run_hist.gather(1, parent[:, :, None].expand(b, k, self.max_len)).clone()
        self.run_hist[:, :, step] = token
        rows = (parent + torch.arange(b, device=parent.device)[:, None] * k).view(-1)
        return rows, token.view(-1)

    def done(self, opts: DecodeOptions) -> torch.Tensor:
        return self._done.clone()

    def results(self, rows: torch.Tensor, opts: DecodeOptions, eos: int) -> list[tuple[int, list[Hypothesis]]]:
        out = []
        for r in rows.tolist():
            sentence = int(self.sentence[r])
            best = sorted(self.finished[sentence], key=lambda st: -st[0])[: opts.num_hypotheses]
            out.append((sentence, [Hypothesis(toks, score) for score, toks in best]))
        return out

    def keep(self, rows: torch.Tensor) -> None:
        for name in ("sentence", "run_scores", "run_hist", "_done"):
            setattr(self, name, getattr(self, name).index_select(0, rows))


class OnmtBeamState(RecordedBeamState):
    """OpenNMT-py 3's beam rules (onmt.translate.BeamSearch with its translate defaults). Each step keeps
    the `beam` best candidates over beam × vocab; those ending in EOS (or at the length limit) are
    recorded with score / (generated + 1) ** alpha — OpenNMT counts the start token — and stay in the
    beam with a score of -65504, so they do not extend. A sentence is done when the best candidate of a
    step has finished and at least n-best hypotheses are recorded; its n-best are the recorded ones
    sorted by score."""

    def step(self, cand_logp: torch.Tensor, cand_ids: torch.Tensor, step: int, opts: DecodeOptions,
             eos: int) -> tuple[torch.Tensor, torch.Tensor]:
        b, k = self.run_scores.shape
        top_scores, parent, token = self.top_candidates(cand_logp, cand_ids, k)
        rows, nxt = self.advance(parent, token, step)
        normalized = top_scores / float((step + 2) ** opts.length_penalty)
        hits = (token == eos) | (step + 1 >= self.max_len)
        self._done = torch.zeros(b, dtype=torch.bool, device=token.device)
        if bool(hits.any()):
            hits_list, scores_list = hits.tolist(), normalized.tolist()
            for i in range(b):
                if not any(hits_list[i]):
                    continue
                record = self.finished[int(self.sentence[i])]
                for j in range(k):
                    if hits_list[i][j]:
                        toks = self.run_hist[i, j, : step + 1].tolist()
                        record.append((scores_list[i][j], toks[:-1] if toks[-1] == eos else toks))
                self._done[i] = hits_list[i][0] and len(record) >= opts.num_hypotheses
        self.run_scores = top_scores.masked_fill(hits, -65504.0)
        return rows, nxt


class FairseqBeamState(RecordedBeamState):
    """fairseq's SequenceGenerator beam rules (BeamSearch). Each step takes the 2 × beam best candidates
    over beam × vocab; EOS candidates among the first `beam` (with a finite score) are finalized in score
    order while the sentence has fewer than `beam` finalized, with score / generated_length **
    length_penalty; the first `beam` non-EOS candidates continue. A sentence is done once it has `beam`
    finalized hypotheses (no early-stopping heuristic). At the last step the caller offers only EOS,
    with its real log-probability, as fairseq forces it."""

    def step(self, cand_logp: torch.Tensor, cand_ids: torch.Tensor, step: int, opts: DecodeOptions,
             eos: int) -> tuple[torch.Tensor, torch.Tensor]:
        b, k = self.run_scores.shape
        top_scores, parent, token = self.top_candidates(cand_logp, cand_ids, 2 * k)
        is_eos = (token == eos) & torch.isfinite(top_scores)
        self._done = torch.zeros(b, dtype=torch.bool, device=token.device)
        if bool(is_eos[:, :k].any()):
            eos_list, scores_list, parents = is_eos[:, :k].tolist(), top_scores.tolist(), parent.tolist()
            norm = float((step + 1) ** opts.length_penalty)
            for i in range(b):
                record = self.finished[int(self.sentence[i])]
                for j in range(k):
                    if eos_list[i][j] and len(record) < k:
                        record.append((scores_list[i][j] / norm, self.run_hist[i, parents[i][j], :step].tolist()))
                self._done[i] = len(record) >= k
        # the first `beam` candidates that are not EOS continue (positions of EOS ones pushed past the end)
        width = top_scores.shape[1]
        order = torch.arange(width, device=token.device) + is_eos.long() * width
        active = torch.topk(order, k, largest=False).indices.sort(dim=1).values
        active = torch.where(active < width, active, active % width)
        self.run_scores = top_scores.gather(1, active)
        return self.advance(parent.gather(1, active), token.gather(1, active), step)


def forced_final_eos(logits: torch.Tensor, eos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fairseq's last step: EOS is the only candidate, with its real log-probability."""
    logp = torch.log_softmax(logits.float(), dim=-1)[:, eos:eos + 1]
    return logp, torch.full_like(logp, eos, dtype=torch.long)


