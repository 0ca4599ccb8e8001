// One beam-search step: Hugging Face's candidate, length-penalty and stopping rules. C = max(2, 1 + end ids) x beam
// candidates per sentence (HF's beams_to_keep: with several end ids more candidates may end, and beam of them must
// still run). Its Python specification is
// tests/reference_search.hf_beam_step; tests compare every field, step after step, and a state whose sentences are at
// different steps (cohorts joined into one search state: each sentence's own length, `steps`) against stepping each
// cohort apart. Ties between equal scores go to the lower index (candidate position, or finished before new), in the
// specification and both versions here.
//
// On CPU tensors a loop per sentence ("loop"): a step touches a few dozen numbers per sentence, and the same rule
// as ~55 ATen ops costs more in dispatch than in arithmetic (~250 µs a call, and a running batch makes a call per
// cohort every step). On other devices the same rule composed of ATen ops ("aten").
#include "beam_search.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace pyengine {

namespace {
constexpr double kExcluded = -1.0e9;  // HF's score for "not a candidate"
constexpr float kExcludedF = static_cast<float>(kExcluded);

at::Tensor expand_rows(const at::Tensor& index, int64_t width) {
  return index.unsqueeze(2).expand({index.size(0), index.size(1), width});
}

// The k best of each row, best first: NaN above all, then the higher value, ties to the lower index.
std::tuple<at::Tensor, at::Tensor> top(const at::Tensor& x, int64_t k) {
  auto [values, indices] = at::sort(x, /*stable=*/true, /*dim=*/1, /*descending=*/true);
  return {values.narrow(1, 0, k), indices.narrow(1, 0, k)};
}

// The indices of the k best of v[0..n), best first, by the same order as `top`.
void best_first(const float* v, int64_t n, int64_t k, int64_t* out, std::vector<int64_t>& idx) {
  idx.resize(n);
  std::iota(idx.begin(), idx.end(), 0);
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [v](int64_t a, int64_t b) {
    const float x = v[a], y = v[b];
    const bool nx = std::isnan(x), ny = std::isnan(y);
    if (nx != ny) return nx;
    if (!nx && x != y) return x > y;
    return a < b;
  });
  std::copy_n(idx.begin(), k, out);
}

// HF's beams_to_keep: max(2, 1 + end ids) x beam candidates per sentence.
int64_t candidates(int64_t beam, const std::vector<int64_t>& ends) {
  return std::max<int64_t>(2, 1 + static_cast<int64_t>(ends.size())) * beam;
}

bool is_end(int64_t token, const std::vector<int64_t>& ends) {
  return std::find(ends.begin(), ends.end(), token) != ends.end();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> beam_step_aten(
    const at::Tensor& cand_logp, const at::Tensor& cand_ids, at::Tensor run_scores, at::Tensor run_hist,
    at::Tensor fin_scores, at::Tensor fin_hist, at::Tensor fin_len, at::Tensor fin_flag, at::Tensor open,
    at::Tensor steps, double length_penalty, int64_t early_stopping, const std::vector<int64_t>& ends) {
  const int64_t b = run_scores.size(0), k = run_scores.size(1), width = run_hist.size(2);
  const int64_t per_row = cand_logp.size(1), c = candidates(k, ends);
  const auto lengths = steps + 1;  // each sentence's hypothesis length after this step
  // x / lengths^p per sentence, the power in double and rounded to the scores' type (as x / scalar rounds it)
  const auto penalized = [&](const at::Tensor& x, const at::Tensor& len) {
    return x / at::pow(len.to(at::kDouble), length_penalty).to(x.scalar_type()).unsqueeze(1);
  };

  // a sentence's best C over beam x vocab, from its rows' own best candidates
  auto acc = (cand_logp.view({b, k, per_row}) + run_scores.unsqueeze(2)).view({b, k * per_row});
  auto [top_scores, top_pos] = top(acc, c);
  auto parent = at::div(top_pos, per_row, "floor");
  auto token = cand_ids.reshape({b, k * per_row}).gather(1, top_pos);
  auto cand_hist = run_hist.gather(1, expand_rows(parent, width));
  cand_hist.scatter_(2, steps.view({b, 1, 1}).expand({b, c, 1}), token.unsqueeze(2));
  auto hits = at::isin(token, at::tensor(ends, token.options()));
  hits.logical_or_(lengths.ge(width).unsqueeze(1));  // the length limit ends every candidate

  // the best K that did not finish keep running
  auto running = top_scores + hits.to(at::kFloat) * kExcluded;
  auto keep = std::get<1>(top(running, k));
  run_scores.copy_(running.gather(1, keep));
  run_hist.copy_(cand_hist.gather(1, expand_rows(keep, width)));
  auto next_parent = parent.gather(1, keep);
  auto next_token = token.gather(1, keep);

  // finished candidates among the first K compete for the finished set, length-normalized
  auto cand = penalized(top_scores, lengths);
  if (early_stopping == 1) cand = cand + fin_flag.all(1, true).to(at::kFloat) * kExcluded;
  cand = cand + open.logical_not().unsqueeze(1).to(at::kFloat) * kExcluded;
  auto first_k = at::zeros({c}, hits.options());
  first_k.slice(0, 0, k).fill_(true);
  auto just_finished = hits.logical_and(first_k.unsqueeze(0));
  cand = cand + just_finished.logical_not().to(at::kFloat) * kExcluded;
  auto merged = at::cat({fin_scores, cand}, 1);
  auto pick = std::get<1>(top(merged, k));
  fin_scores.copy_(merged.gather(1, pick));
  fin_hist.copy_(at::cat({fin_hist, cand_hist}, 1).gather(1, expand_rows(pick, width)));
  fin_len.copy_(at::cat({fin_len, lengths.unsqueeze(1).expand({b, c})}, 1).gather(1, pick));
  fin_flag.copy_(at::cat({fin_flag, just_finished}, 1).gather(1, pick));

  // HF's heuristic: can the best running hypothesis still beat the worst finished one?
  const auto best_len = (early_stopping == 2 && length_penalty > 0) ? at::full_like(lengths, width) : lengths;
  auto best = penalized(run_scores.slice(1, 0, 1), best_len);
  auto worst = at::where(fin_flag, fin_scores.amin(1, true), at::scalar_tensor(kExcluded, fin_scores.options()));
  open.logical_and_(best.gt(worst).any(1));
  steps.add_(1);

  auto rows = (next_parent + at::arange(b, next_parent.options()).unsqueeze(1) * k).view(-1);
  return {rows, next_token.reshape(-1), parent, pick};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> beam_step_loop(
    const at::Tensor& cand_logp_in, const at::Tensor& cand_ids_in, at::Tensor run_scores, at::Tensor run_hist,
    at::Tensor fin_scores, at::Tensor fin_hist, at::Tensor fin_len, at::Tensor fin_flag, at::Tensor open,
    at::Tensor steps, double length_penalty, int64_t early_stopping, const std::vector<int64_t>& ends) {
  for (const at::Tensor* t : {&run_scores, &run_hist, &fin_scores, &fin_hist, &fin_len, &fin_flag, &open, &steps})
    TORCH_CHECK(t->is_contiguous(), "beam_step: the state tensors must be contiguous");
  TORCH_CHECK(run_scores.scalar_type() == at::kFloat && fin_scores.scalar_type() == at::kFloat &&
                  run_hist.scalar_type() == at::kLong && fin_hist.scalar_type() == at::kLong &&
                  fin_len.scalar_type() == at::kLong && fin_flag.scalar_type() == at::kBool &&
                  open.scalar_type() == at::kBool,
              "beam_step: float32 scores, int64 histories and lengths, bool flags");
  const at::Tensor cand_logp = cand_logp_in.to(at::kFloat).contiguous(), cand_ids = cand_ids_in.to(at::kLong).contiguous();
  const int64_t B = run_scores.size(0), K = run_scores.size(1), W = run_hist.size(2), P = cand_logp.size(1);
  const int64_t C = candidates(K, ends);
  at::Tensor rows = at::empty({B * K}, cand_ids.options()), next = at::empty({B * K}, cand_ids.options());
  at::Tensor parents = at::empty({B, C}, cand_ids.options()), picks = at::empty({B, K}, cand_ids.options());
  const float* logp = cand_logp.data_ptr<float>();
  const int64_t* ids = cand_ids.data_ptr<int64_t>();
  float* run_s = run_scores.data_ptr<float>();
  float* fin_s = fin_scores.data_ptr<float>();
  int64_t *run_h = run_hist.data_ptr<int64_t>(), *fin_h = fin_hist.data_ptr<int64_t>(), *fin_l = fin_len.data_ptr<int64_t>();
  bool *fin_f = fin_flag.data_ptr<bool>(), *open_p = open.data_ptr<bool>();
  int64_t *rows_p = rows.data_ptr<int64_t>(), *next_p = next.data_ptr<int64_t>();
  int64_t *parent_p = parents.data_ptr<int64_t>(), *pick_p = picks.data_ptr<int64_t>();
  int64_t* steps_p = steps.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)  // all checked before any sentence's state changes
    TORCH_CHECK(steps_p[b] >= 0 && steps_p[b] < W, "beam_step: step ", steps_p[b], " outside the history of ", W);

  std::vector<float> acc(K * P), running(C), cand(C), merged(K + C);
  std::vector<int64_t> idx, top_pos(C), token(C), keep(K), pick(K), old_len(K);
  std::vector<int64_t> cand_hist(C * W), old_hist(K * W);
  std::vector<float> old_scores(K);
  std::vector<char> hits(C), just(C), old_flag(K);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t step = steps_p[b];
    const float denom = static_cast<float>(std::pow(static_cast<double>(step + 1), length_penalty));
    const int64_t best_len = (early_stopping == 2 && length_penalty > 0) ? W : step + 1;
    const float best_denom = static_cast<float>(std::pow(static_cast<double>(best_len), length_penalty));
    // a sentence's best C over beam x vocab, from its rows' own best candidates
    for (int64_t r = 0; r < K; ++r)
      for (int64_t c = 0; c < P; ++c) acc[r * P + c] = logp[(b * K + r) * P + c] + run_s[b * K + r];
    best_first(acc.data(), K * P, C, top_pos.data(), idx);
    for (int64_t i = 0; i < C; ++i) {
      const int64_t parent = top_pos[i] / P;
      parent_p[b * C + i] = parent;
      token[i] = ids[b * K * P + top_pos[i]];
      std::copy_n(run_h + (b * K + parent) * W, W, cand_hist.data() + i * W);
      cand_hist[i * W + step] = token[i];
      hits[i] = is_end(token[i], ends) || step + 1 >= W;  // the length limit ends every candidate
      running[i] = acc[top_pos[i]] + (hits[i] ? 1.f : 0.f) * kExcludedF;
    }
    // the best K that did not finish keep running
    best_first(running.data(), C, K, keep.data(), idx);
    for (int64_t j = 0; j < K; ++j) {
      run_s[b * K + j] = running[keep[j]];
      std::copy_n(cand_hist.data() + keep[j] * W, W, run_h + (b * K + j) * W);
      rows_p[b * K + j] = parent_p[b * C + keep[j]] + b * K;
      next_p[b * K + j] = token[keep[j]];
    }
    // finished candidates among the first K compete for the finished set, length-normalized
    bool all_finished = true;
    for (int64_t j = 0; j < K; ++j) all_finished = all_finished && fin_f[b * K + j];
    for (int64_t i = 0; i < C; ++i) {
      float c = acc[top_pos[i]] / denom;
      if (early_stopping == 1) c = c + (all_finished ? 1.f : 0.f) * kExcludedF;
      c = c + (open_p[b] ? 0.f : 1.f) * kExcludedF;
      just[i] = hits[i] && i < K;
      cand[i] = c + (just[i] ? 0.f : 1.f) * kExcludedF;
    }
    for (int64_t j = 0; j < K; ++j) merged[j] = fin_s[b * K + j];
    std::copy_n(cand.data(), C, merged.data() + K);
    best_first(merged.data(), K + C, K, pick.data(), idx);
    std::copy_n(fin_s + b * K, K, old_scores.data());
    std::copy_n(fin_h + b * K * W, K * W, old_hist.data());
    std::copy_n(fin_l + b * K, K, old_len.data());
    for (int64_t j = 0; j < K; ++j) old_flag[j] = fin_f[b * K + j];
    for (int64_t j = 0; j < K; ++j) {
      const int64_t p = pick[j];
      pick_p[b * K + j] = p;
      fin_s[b * K + j] = merged[p];
      const bool old = p < K;
      std::copy_n(old ? old_hist.data() + p * W : cand_hist.data() + (p - K) * W, W, fin_h + (b * K + j) * W);
      fin_l[b * K + j] = old ? old_len[p] : step + 1;
      fin_f[b * K + j] = old ? old_flag[p] : just[p - K];
    }
    // HF's heuristic: can the best running hypothesis still beat the worst finished one?
    const float best = run_s[b * K] / best_denom;
    float worst = fin_s[b * K];
    for (int64_t j = 1; j < K; ++j) worst = std::min(worst, fin_s[b * K + j]);
    bool beatable = false;
    for (int64_t j = 0; j < K; ++j) beatable = beatable || best > (fin_f[b * K + j] ? worst : kExcludedF);
    open_p[b] = open_p[b] && beatable;
    steps_p[b] = step + 1;
  }
  return {rows, next, parents, picks};
}
}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> beam_step(
    const at::Tensor& cand_logp, const at::Tensor& cand_ids, at::Tensor run_scores, at::Tensor run_hist,
    at::Tensor fin_scores, at::Tensor fin_hist, at::Tensor fin_len, at::Tensor fin_flag, at::Tensor open,
    at::Tensor steps, double length_penalty, int64_t early_stopping, const std::vector<int64_t>& ends,
    const std::string& impl) {
  TORCH_CHECK(run_scores.dim() == 2 && run_hist.dim() == 3, "run_scores (B, K) and run_hist (B, K, T) expected");
  const int64_t b = run_scores.size(0), k = run_scores.size(1), width = run_hist.size(2);
  TORCH_CHECK(cand_logp.dim() == 2 && cand_logp.size(0) == b * k && cand_ids.sizes() == cand_logp.sizes(),
              "candidates must be (B*K, C) for run_scores (B, K)");
  TORCH_CHECK(steps.dim() == 1 && steps.size(0) == b && steps.scalar_type() == at::kLong &&
                  steps.device() == run_scores.device(),
              "beam_step: steps must be (B,) int64 on the state's device, one per sentence");
  TORCH_CHECK(!ends.empty(), "beam_step: no end id");
  TORCH_CHECK(candidates(k, ends) <= cand_logp.size(1) * k, "beam_step: ", cand_logp.size(1), " candidates per row ",
              "are fewer than the ", candidates(k, ends), " per sentence the rule takes");
  TORCH_CHECK(impl == "auto" || impl == "loop" || impl == "aten", "beam_step: impl is auto, loop or aten, not ", impl);
  const bool loop = impl == "loop" || (impl == "auto" && run_scores.is_cpu());
  TORCH_CHECK(!loop || run_scores.is_cpu(), "beam_step: the loop runs on CPU tensors");
  return (loop ? beam_step_loop : beam_step_aten)(cand_logp, cand_ids, run_scores, run_hist, fin_scores, fin_hist,
                                                   fin_len, fin_flag, open, steps, length_penalty, early_stopping,
                                                   ends);
}

std::tuple<at::Tensor, at::Tensor, bool> greedy_step(const at::Tensor& logp, const at::Tensor& ids, at::Tensor scores,
                                                     at::Tensor history, int64_t step, const std::vector<int64_t>& ends,
                                                     bool last) {
  TORCH_CHECK(logp.dim() == 2 && ids.sizes() == logp.sizes() && logp.size(1) >= 1 && logp.is_cpu() && ids.is_cpu() &&
                  logp.scalar_type() == at::kFloat && ids.scalar_type() == at::kLong,
              "greedy_step: candidates (N, k >= 1), float32 log-probs and int64 ids on the CPU expected");
  const int64_t n = logp.size(0);
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == n && scores.scalar_type() == at::kFloat && scores.is_contiguous() &&
                  history.dim() == 2 && history.size(0) == n && history.scalar_type() == at::kLong &&
                  history.is_contiguous() && scores.is_cpu() && history.is_cpu(),
              "greedy_step: scores (N,) float32 and history (N, T) int64, contiguous CPU tensors, expected");
  TORCH_CHECK(step >= 0 && step < history.size(1), "greedy_step: step ", step, " outside the history of ",
              history.size(1));
  const int64_t width = history.size(1), lp_stride = logp.stride(0), id_stride = ids.stride(0);
  const float* lp = logp.data_ptr<float>();
  const int64_t* id = ids.data_ptr<int64_t>();
  float* score = scores.data_ptr<float>();
  int64_t* hist = history.data_ptr<int64_t>();
  at::Tensor next = at::empty({n}, ids.options()), done = at::empty({n}, ids.options().dtype(at::kBool));
  int64_t* next_p = next.data_ptr<int64_t>();
  bool* done_p = done.data_ptr<bool>();
  bool any = false;
  for (int64_t r = 0; r < n; ++r) {
    const int64_t token = id[r * id_stride];
    next_p[r] = token;
    score[r] = score[r] + lp[r * lp_stride];
    hist[r * width + step] = token;
    done_p[r] = last || std::find(ends.begin(), ends.end(), token) != ends.end();
    any = any || done_p[r];
  }
  return {next, done, any};
}

}  // namespace pyengine
