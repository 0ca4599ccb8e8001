// One beam-search step on ATen tensors (CPU or CUDA): Hugging Face's candidate, length-penalty and
// stopping rules. The Python reference is pyengine.decoding.BeamState.step; tests compare the two.
#include "beam_search.h"

#include <cmath>

namespace pyengine {

namespace {
constexpr double kExcluded = -1.0e9;  // HF's score for "not a candidate"

at::Tensor expand_rows(const at::Tensor& index, int64_t width) {
  return index.unsqueeze(2).expand({index.size(0), index.size(1), width});
}
}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> beam_step(
    const at::Tensor& cand_logp, const at::Tensor& cand_ids, at::Tensor run_scores, at::Tensor run_hist,
    at::Tensor fin_scores, at::Tensor fin_hist, at::Tensor fin_len, at::Tensor fin_flag, at::Tensor open,
    int64_t step, double length_penalty, int64_t early_stopping, int64_t eos) {
  TORCH_CHECK(run_scores.dim() == 2 && run_hist.dim() == 3, "run_scores (B, K) and run_hist (B, K, T) expected");
  const int64_t b = run_scores.size(0), k = run_scores.size(1), width = run_hist.size(2);
  const int64_t per_row = cand_logp.size(1);
  TORCH_CHECK(cand_logp.size(0) == b * k && cand_ids.sizes() == cand_logp.sizes(),
              "candidates must be (B*K, C) for run_scores (B, K)");
  TORCH_CHECK(step >= 0 && step < width, "step ", step, " outside the history of ", width);

  // a sentence's best 2K over beam x vocab, from its rows' own best candidates
  auto acc = (cand_logp.view({b, k, per_row}) + run_scores.unsqueeze(2)).view({b, k * per_row});
  auto [top_scores, top_pos] = at::topk(acc, 2 * k);
  auto parent = at::div(top_pos, per_row, "floor");
  auto token = cand_ids.reshape({b, k * per_row}).gather(1, top_pos);
  auto cand_hist = run_hist.gather(1, expand_rows(parent, width));
  cand_hist.select(2, step).copy_(token);
  auto hits = token.eq(eos);
  if (step + 1 >= width) hits.fill_(true);  // the length limit ends every candidate

  // the best K that did not finish keep running
  auto running = top_scores + hits.to(at::kFloat) * kExcluded;
  auto keep = std::get<1>(at::topk(running, k));
  run_scores.copy_(running.gather(1, keep));
  run_hist.copy_(cand_hist.gather(1, expand_rows(keep, width)));
  auto next_parent = parent.gather(1, keep);
  auto next_token = token.gather(1, keep);

  // finished candidates among the first K compete for the finished set, length-normalized
  auto cand = top_scores / std::pow(static_cast<double>(step + 1), length_penalty);
  if (early_stopping == 1) cand = cand + fin_flag.all(1, true).to(at::kFloat) * kExcluded;
  cand = cand + open.logical_not().unsqueeze(1).to(at::kFloat) * kExcluded;
  auto first_k = at::zeros({2 * k}, hits.options());
  first_k.slice(0, 0, k).fill_(true);
  auto just_finished = hits.logical_and(first_k.unsqueeze(0));
  cand = cand + just_finished.logical_not().to(at::kFloat) * kExcluded;
  auto merged = at::cat({fin_scores, cand}, 1);
  auto pick = std::get<1>(at::topk(merged, k));
  fin_scores.copy_(merged.gather(1, pick));
  fin_hist.copy_(at::cat({fin_hist, cand_hist}, 1).gather(1, expand_rows(pick, width)));
  fin_len.copy_(at::cat({fin_len, at::full({b, 2 * k}, step + 1, fin_len.options())}, 1).gather(1, pick));
  fin_flag.copy_(at::cat({fin_flag, just_finished}, 1).gather(1, pick));

  // HF's heuristic: can the best running hypothesis still beat the worst finished one?
  const int64_t best_len = (early_stopping == 2 && length_penalty > 0) ? width : step + 1;
  auto best = run_scores.slice(1, 0, 1) / std::pow(static_cast<double>(best_len), length_penalty);
  auto worst = at::where(fin_flag, fin_scores.amin(1, true), at::scalar_tensor(kExcluded, fin_scores.options()));
  open.logical_and_(best.gt(worst).any(1));

  auto rows = (next_parent + at::arange(b, next_parent.options()).unsqueeze(1) * k).view(-1);
  return {rows, next_token.reshape(-1), parent, pick};
}

}  // namespace pyengine
