#pragma once
// What the int8, bf16 and float32 GEMMs share: their activation argument, the pass that writes y, and the output
// layer fused with log-softmax + top-k.
//
// The fused output layer: at a decoder step
// the output layer's logits ((rows, V) float32: 7 MB at 32 rows of a 58k vocabulary) were written to memory, then
// read back by the log-softmax + top-k. Instead a GEMM hands each row block's logits, still in an L1 buffer, to
// `absorb`: per row a running log-sum-exp (16 lanes: an offset near the lane's max and the sum of exp relative to
// it) and the k best (logit, id) so far take them in; nothing (rows, V) is written.
#include "aten.h"

#include "int8_gemm.h"  // Activation
#include "parallel.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

namespace pyengine {
namespace gemm {

constexpr int64_t kCols = 64;  // the GEMMs' tile width: a block's logits are rows × 64, row stride 64
constexpr int kBlockRows = 16;  // the most rows a GEMM's tile call writes

// At least `bytes` (64-byte aligned) of the calling thread's buffer for one GEMM call's activation operands (the int8
// GEMM's quantized rows, scales and zero points; the bf16 GEMM's two split terms), reused from call to call: they
// were at::empty tensors, two or three a call at ~1 µs each, and a decoder step makes 36 calls (paired by
// benchmarks.ab_builds, int8 batch 1: 1.036x and 1.064x, its decoder 1.087x and 1.115x; bf16 batch 1 1.007x; batch 32
// 0.999-1.006x). Up to kScratchKept bytes stay allocated between calls; a larger buffer (an encoder's long batch) is
// given back at the next smaller request rather than held. One call's operands at a time per thread: a GEMM uses
// them before its thread prepares another.
constexpr size_t kScratchKept = size_t{4} << 20;
uint8_t* thread_scratch(size_t bytes);

// A GEMM's `activation` argument ("none", "relu" or "swish": what its epilogue applies), or an error naming `who`.
Activation activation_named(const char* who, const std::string& activation);

// y (M, n_out) float32 (into `out` when given): run(tiles, y) computes a thread's column tiles into y (Claims: a
// share of its own, and tiles taken from another's end when done, parallel.h), so each weight tile is streamed once.
template <typename Run>
at::Tensor linear_into(const char* who, const at::Tensor& x, int64_t M, int64_t n_out, int64_t tiles,
                       const c10::optional<at::Tensor>& out, Run run) {
  at::Tensor y;
  if (out) {
    TORCH_CHECK(out->scalar_type() == at::kFloat && out->is_contiguous() && out->numel() == M * n_out,
                who, ": out must be a contiguous float32 tensor of M·N elements");
    y = *out;
  } else {
    y = at::empty({M, n_out}, x.options().dtype(at::kFloat));
  }
  if (M == 0) return y;
  float* yp = y.data_ptr<float>();
  parallel_claims(tiles, [&](Claims& mine) { run(mine, yp); });
  return y;
}

// One thread's row blocks of its column tiles on AMX, each block's epilogue overlapped with the next block's
// multiply (across the tiles it steals too). multiply(t, m0, next, acc, drain) computes the block of tile t at row
// m0 into acc (kBlockRows × kCols sums; next ≥ 0: the thread's next tile, to be prefetched meanwhile),
// calling drain(step, steps) between its k-steps; epilogue(acc, m0, n0, width, y, ldy, r0, r1) writes rows [r0, r1)
// of a block from its sums to y (from out(m0, n0)), then after(m0, r0, rows, n0, width) sees them (as run_tiles).
// The sums of a block wait in one of two buffers while the next block multiplies and drain finishes their rows a few
// at a time, so the vector units (dequantization, activation, the fused output layer's log-sum-exp) work while the
// tile unit multiplies, not after it. Every row gets the operations it would get right after its multiply: the same
// results, to the bit.
template <typename Acc, typename Multiply, typename Epilogue, typename Out, typename After>
void overlapped_blocks(Claims& tiles, int64_t M, int64_t n_out, Multiply multiply, Epilogue epilogue, Out out,
                       After after) {
  alignas(64) Acc acc[2][kBlockRows * kCols];
  int cur = 0;  // the buffer the running multiply stores into; the pending block's is the other
  struct { int64_t t, m0; int rows, done; } pending{0, 0, 0, 0};  // rows 0: none yet
  auto finish_to = [&](int r1) {  // the pending block's rows up to r1
    r1 = std::min(r1, pending.rows);
    if (r1 <= pending.done) return;
    const int64_t n0 = pending.t * kCols, width = std::min(kCols, n_out - n0);
    const auto [y, ldy] = out(pending.m0, n0);
    epilogue(acc[cur ^ 1], pending.m0, n0, width, y, ldy, pending.done, r1);
    after(pending.m0, pending.done, r1 - pending.done, n0, width);
    pending.done = r1;
  };
  auto drain = [&](int64_t step, int64_t steps) { finish_to(static_cast<int>(pending.rows * step / steps)); };
  for (int64_t t; tiles.next(t);)
    for (int64_t m0 = 0; m0 < M; m0 += kBlockRows) {
      multiply(t, m0, m0 == 0 ? tiles.upcoming() : -1, acc[cur], drain);
      finish_to(kBlockRows);
      pending = {t, m0, static_cast<int>(std::min<int64_t>(kBlockRows, M - m0)), 0};
      cur ^= 1;
    }
  finish_to(kBlockRows);
}

// AMX: this thread's tile configuration for a GEMM of M > 0 rows, loaded at the start of a thread's share of it
// (amx_begin) and released at its end (amx_end). x86-64 with AMX only. Every tile is 64 bytes wide; the weight tiles
// (tmm5, tmm6) have 16 rows (k), the sums (tmm0-3) and the activations (tmm4, tmm7) min(M, kBlockRows): a GEMM of
// fewer rows than a block loads and multiplies only those (each row's sums are computed alone, so its results are
// the same, to the bit).
void amx_begin(int64_t M);
void amx_end();

// The activation rows a GEMM of M rows allocates: past M only for a partial AMX block after whole ones, which reads
// kBlockRows (the extra rows zeroed; their sums are never stored). A GEMM of fewer rows has AMX tiles of its own rows
// (amx_begin), and the register tiles read a block's own rows.
inline int64_t rows_allocated(int64_t M, bool amx) {
  return amx && M > kBlockRows ? (M + kBlockRows - 1) / kBlockRows * kBlockRows : M;
}

// One thread's running state for each row: the lanes of the part it is in — per lane an offset near the max and
// Σexp(x − offset), kept per part (LaneSums), so a row's log-sum-exp never depends on which thread ran which part —
// and the k best of every part the thread ran, best first: by value, then the lower id (a thread meets parts out of
// order).
struct TopKState {
  int64_t k;
  float* lane_offset = nullptr;  // the current part's lanes, rows × 16 each
  float* lane_sum = nullptr;
  std::vector<float> best_value;
  std::vector<int64_t> best_id, count;

  TopKState(int64_t rows, int64_t k);
  void offer(int64_t row, float v, int64_t id);
  // the value a logit must reach to be offered (inline: the absorb asks once per row and block): the k-th best held
  // (an equal logit with a lower id belongs ahead of it), -inf until k are held
  float threshold(int64_t row) const {
    return count[row] == k ? best_value[row * k + k - 1] : -std::numeric_limits<float>::infinity();
  }
};

// Every part's lanes: per part, row and lane a running offset and Σexp(x − offset).
struct LaneSums {
  int64_t rows, size;  // size: parts × rows × 16
  std::vector<float> offset, sum;
  LaneSums(int64_t parts, int64_t rows);
  void enter(int64_t part, TopKState& st) {  // the state absorbs into this part's lanes
    st.lane_offset = offset.data() + part * rows * 16, st.lane_sum = sum.data() + part * rows * 16;
  }
};

// A row block's logits (rows × width at y, row stride kCols, columns from n0) into the state; banned: bits of
// the 64 columns from n0 that are never candidates.
using AbsorbFn = void (*)(const float* y, int rows, int64_t m0, int64_t n0, int64_t width, uint64_t banned,
                          TopKState& st);
AbsorbFn pick_absorb(bool vectorized);  // AVX-512 where asked and the CPU has it, else the scalar twin

// The banned ids sorted and unique, checked against the vocabulary (n_out) and k.
std::vector<int64_t> checked_banned(const char* who, const at::Tensor& banned, int64_t n_out, int64_t k);

// Banned columns of the 64 from n0, as bits (banned: sorted ids).
uint64_t banned_bits(const std::vector<int64_t>& banned, int64_t n0);

// Each row's result: log Σexp over every logit (banned ones too, as after HF's log_softmax + processors) from the
// parts' lanes, summed in part order, and the k best of the threads' best, as log-probs, best first (ties to the
// lower id). vectorized: the log-sum-exp's terms by AVX-512 where the CPU has it.
void merge_rows(const LaneSums& lanes, const std::vector<TopKState>& states, int64_t rows, float* values,
                int64_t* ids, bool vectorized);

// The fused output layer's parts: a fixed count, so its results do not depend on the number of threads, and enough
// that a thread done early takes whole parts from a slowed one (parallel.h).
constexpr int64_t kOutputParts = 16;

// The fused pass: the `tiles` column tiles in kOutputParts parts, each with its own lanes, shared by the threads with
// stealing, each thread with its own k best; run_part(part, block, after) runs a GEMM's tiles of the part (Claims)
// for every row block into `block` (kBlockRows × kCols floats) and calls after(m0, r0, rows, n0, width) on each:
// rows [r0, r0 + rows) of the block at m0 are ready in `block` from its row r0 (a pipelined GEMM hands a block over
// a few rows at a time). Returns each row's k best (log-prob, id).
template <typename RunPart>
std::tuple<at::Tensor, at::Tensor> linear_log_softmax_topk(const char* who, const at::Tensor& x, int64_t M,
                                                           int64_t n_out, int64_t tiles, int64_t k,
                                                           const at::Tensor& banned, bool vectorized,
                                                           RunPart run_part) {
  const std::vector<int64_t> ban = checked_banned(who, banned, n_out, k);
  auto values = at::empty({M, k}, x.options().dtype(at::kFloat));
  auto ids = at::empty({M, k}, x.options().dtype(at::kLong));
  if (M == 0) return {values, ids};
  const int64_t parts = std::min<int64_t>(kOutputParts, tiles);
  LaneSums lanes(parts, M);
  std::vector<TopKState> states(at::get_num_threads(), TopKState(M, k));
  const AbsorbFn absorb = pick_absorb(vectorized);
  parallel_claims(parts, [&](Claims& mine) {
    alignas(64) float block[kBlockRows * kCols];
    TopKState& st = states[at::get_thread_num()];
    for (int64_t p; mine.next(p);) {
      lanes.enter(p, st);
      Claims part(tiles * p / parts, tiles * (p + 1) / parts);
      run_part(part, block,
               [&](int64_t m0, int r0, int rows, int64_t n0, int64_t width) {
                 absorb(block + r0 * kCols, rows, m0 + r0, n0, width, banned_bits(ban, n0), st);
               });
    }
  });
  merge_rows(lanes, states, M, values.data_ptr<float>(), ids.data_ptr<int64_t>(), vectorized);
  return {values, ids};
}

}  // namespace gemm
}  // namespace pyengine
