#pragma once
#include "aten.h"

#include <string>
#include <vector>
#include <tuple>

namespace pyengine {

// One step of HF-rule beam search. Updates the state tensors in place; returns (parent row per new row (B*K,), next
// token (B*K,), each candidate's beam (B, C), C = max(2, 1 + ends) x beam (HF's beams_to_keep), and which of
// [finished set | candidates] now fill the finished set (B, K)); the last two let the caller carry per-hypothesis
// data (attention) along. steps (B,) int64: each sentence's step (tokens generated before this one), advanced by one
// here: sentences of cohorts admitted at different steps share a state. early_stopping: 0 = False, 1 = True,
// 2 = "never". Ties between equal scores go to the lower index.
// impl: "loop" (CPU tensors), "aten" (any device), "auto" (the loop on CPU).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> beam_step(
    const at::Tensor& cand_logp, const at::Tensor& cand_ids, at::Tensor run_scores, at::Tensor run_hist,
    at::Tensor fin_scores, at::Tensor fin_hist, at::Tensor fin_len, at::Tensor fin_flag, at::Tensor open,
    at::Tensor steps, double length_penalty, int64_t early_stopping, const std::vector<int64_t>& ends,
    const std::string& impl = "auto");

// One greedy step's bookkeeping over CPU tensors, Greedy.advance's ATen calls in one pass: per row r the chosen
// token is ids[r, 0] (its log-prob logp[r, 0]: the best of the row's candidates); scores[r] += that log-prob
// (float32), history[r, step] = the token (both in place); the row ends when its token is one of `ends`, or every row
// does when `last`. Returns (the tokens (N,) int64, which rows end (N,) bool, whether any does).
std::tuple<at::Tensor, at::Tensor, bool> greedy_step(const at::Tensor& logp, const at::Tensor& ids, at::Tensor scores,
                                                     at::Tensor history, int64_t step, const std::vector<int64_t>& ends,
                                                     bool last);

}  // namespace pyengine
