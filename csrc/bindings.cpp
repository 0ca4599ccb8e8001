// pyengine._C: the C++ side of the engine: the functions of csrc/*.cpp, nothing else.
#include <torch/python.h>  // pybind11 and its Tensor casters (not all of <torch/extension.h>)
#include <torch/version.h>

#include "beam_search.h"
#include "bf16_gemm.h"
#include "cpu_features.h"
#include "decode_attention.h"
#include "decoder_step.h"
#include "embedding.h"
#include "encoder_stack.h"
#include "f32_gemm.h"
#include "int8_gemm.h"
#include "kv_table.h"
#include "layer_norm.h"
#include "softmax_topk.h"

namespace pyengine {

// What this build contains and which CPU features its kernels use here (cpu_features.h), so Python reports
// backends without guessing.
pybind11::dict build_info() {
  pybind11::dict info;
  info["torch_version"] = TORCH_VERSION;
  info["avx512_vnni"] = vnni_available();
  info["amx_int8"] = amx_available();
  info["amx_bf16"] = amx_bf16_available();
  info["avx512"] = avx512_available();
  info["avx512_bf16"] = avx512_bf16_available();
  info["cpu_isa"] = cpu_isa();          // the highest level the kernels use here
  info["cpu_isa_cap"] = cpu_isa_cap();  // PYENGINE_MAX_CPU_ISA ("" when unset)
  info["cpu_isa_error"] = cpu_isa_error();  // why that cap cannot be used ("" when it can)
  return info;
}

}  // namespace pyengine

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The compute functions run without the GIL (their arguments are converted before, their results after): a
  // server's HTTP thread parses and answers requests while the decoder step runs, instead of contending for the
  // GIL with the worker's Python between steps. They touch no Python object.
  const pybind11::call_guard<pybind11::gil_scoped_release> nogil;
  m.doc() = "pyengine C++ extension";
  m.def("build_info", &pyengine::build_info, "What this build of pyengine._C contains.");
  m.def("beam_step", &pyengine::beam_step, nogil,
        "One HF-rule beam-search step over max(2, 1 + len(ends)) x beam candidates; updates the state in place.",
        pybind11::arg("cand_logp"), pybind11::arg("cand_ids"), pybind11::arg("run_scores"), pybind11::arg("run_hist"),
        pybind11::arg("fin_scores"), pybind11::arg("fin_hist"), pybind11::arg("fin_len"), pybind11::arg("fin_flag"),
        pybind11::arg("open"), pybind11::arg("steps"), pybind11::arg("length_penalty"),
        pybind11::arg("early_stopping"), pybind11::arg("ends"), pybind11::arg("impl") = "auto");
  m.def("greedy_step", &pyengine::greedy_step, nogil,
        "One greedy step's bookkeeping (CPU): the chosen tokens (column 0) into scores and history in place; "
        "(tokens, rows that end, whether any does).",
        pybind11::arg("logp"), pybind11::arg("ids"), pybind11::arg("scores"), pybind11::arg("history"),
        pybind11::arg("step"), pybind11::arg("ends"), pybind11::arg("last"));
  m.def("decode_attention", &pyengine::decode_attention, nogil,
        "softmax(q·kᵀ·scale)·v for a decoder step's few query rows per (sentence, head), fused (CPU, float32).",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("kv_lengths"), pybind11::arg("scale"),
        pybind11::arg("rows") = pybind11::none());
  m.def("add_layer_norm", &pyengine::add_layer_norm, nogil,
        "LN(x + residual) (LN(x) when residual is None) over the last dim of contiguous float32 CPU tensors.",
        pybind11::arg("x"), pybind11::arg("residual"), pybind11::arg("weight"), pybind11::arg("bias"),
        pybind11::arg("eps"), pybind11::arg("portable") = false);
  m.def("embed_rows", &pyengine::embed_rows, nogil,
        "table[ids]·scale + positions_table[positions + offset], one token a row (float32 CPU; zero_start: Marian's "
        "zero first decoder input).",
        pybind11::arg("table"), pybind11::arg("ids"), pybind11::arg("scale"), pybind11::arg("positions_table"),
        pybind11::arg("positions"), pybind11::arg("offset"), pybind11::arg("zero_start"));
  m.def("kv_step_table", &pyengine::kv_step_table, nogil,
        "The KV cache's row table at a step of rows 0..n-1 at one position: origin[r, position] = write_rows[r]; "
        "(positions (n,), origin[:n, :end] copied).",
        pybind11::arg("origin"), pybind11::arg("write_rows"), pybind11::arg("position"), pybind11::arg("end"));
  m.def("kv_select", &pyengine::kv_select, nogil,
        "origin[:n, :length] = origin[rows, :length] in place (n = len(rows); gathered before written).",
        pybind11::arg("origin"), pybind11::arg("rows"), pybind11::arg("length"));
  m.def("int8_kernel_name", &pyengine::int8_kernel_name,
        "The tile int8_linear runs for `kernel` on rows × k activations: amx, vnni or portable.",
        pybind11::arg("kernel"), pybind11::arg("rows"), pybind11::arg("k"));
  m.def("int8_pack", &pyengine::int8_pack, nogil,
        "Pack int8 (N, K) weights for int8_linear: (packed tiles, int32 column sums).", pybind11::arg("q"));
  m.def("int8_linear", &pyengine::int8_linear, nogil,
        "act(x·(q·scale)ᵀ + bias) with x quantized per row to uint8, int32 accumulation (AMX-INT8 or AVX512-VNNI; CPU).",
        pybind11::arg("x"), pybind11::arg("packed"), pybind11::arg("colsum"), pybind11::arg("scale"),
        pybind11::arg("bias"), pybind11::arg("n_out"), pybind11::arg("out") = pybind11::none(),
        pybind11::arg("kernel") = "auto", pybind11::arg("activation") = "none");
  m.def("int8_linear_log_softmax_topk", &pyengine::int8_linear_log_softmax_topk, nogil,
        "Each row's k best (log-prob, column) of x·(q·scale)ᵀ + bias, the logits never written (int8, CPU); "
        "banned columns count in the normalizer but are never candidates.",
        pybind11::arg("x"), pybind11::arg("packed"), pybind11::arg("colsum"), pybind11::arg("scale"),
        pybind11::arg("bias"), pybind11::arg("n_out"), pybind11::arg("k"), pybind11::arg("banned"),
        pybind11::arg("kernel") = "auto");
  pybind11::class_<pyengine::Int8Weight>(m, "Int8Weight", "An int8 linear layer's weight as int8_linear reads it.")
      .def(pybind11::init([](at::Tensor packed, at::Tensor colsum, at::Tensor scale, c10::optional<at::Tensor> bias,
                             int64_t n) { return pyengine::Int8Weight{packed, colsum, scale, bias, n}; }),
           pybind11::arg("packed"), pybind11::arg("colsum"), pybind11::arg("scale"), pybind11::arg("bias"),
           pybind11::arg("n"))
      .def_readonly("packed", &pyengine::Int8Weight::packed)
      .def_readonly("colsum", &pyengine::Int8Weight::colsum)
      .def_readonly("scale", &pyengine::Int8Weight::scale)
      .def_readonly("bias", &pyengine::Int8Weight::bias)
      .def_readonly("n", &pyengine::Int8Weight::n);
  pybind11::class_<pyengine::Bf16Weight>(m, "Bf16Weight", "A bf16 linear layer's weight as bf16_linear reads it.")
      .def(pybind11::init([](at::Tensor packed, c10::optional<at::Tensor> bias, int64_t n) {
             return pyengine::Bf16Weight{packed, bias, n};
           }),
           pybind11::arg("packed"), pybind11::arg("bias"), pybind11::arg("n"))
      .def_readonly("packed", &pyengine::Bf16Weight::packed)
      .def_readonly("bias", &pyengine::Bf16Weight::bias)
      .def_readonly("n", &pyengine::Bf16Weight::n);
  pybind11::class_<pyengine::FloatWeight>(m, "FloatWeight",
                                          "A float32 linear layer's weight as FloatLinear runs it (oneDNN's prepacked "
                                          "copy where it has one).")
      .def(pybind11::init([](at::Tensor weight, c10::optional<at::Tensor> packed, c10::optional<at::Tensor> bias,
                             int64_t n) { return pyengine::FloatWeight{weight, packed, bias, n}; }),
           pybind11::arg("weight"), pybind11::arg("packed"), pybind11::arg("bias"), pybind11::arg("n"))
      .def_readonly("n", &pyengine::FloatWeight::n);
  pybind11::class_<pyengine::F32Weight>(m, "F32Weight", "A float32 linear layer's weight as f32_linear reads it.")
      .def(pybind11::init([](at::Tensor packed, c10::optional<at::Tensor> bias, int64_t n) {
             return pyengine::F32Weight{packed, bias, n};
           }),
           pybind11::arg("packed"), pybind11::arg("bias"), pybind11::arg("n"))
      .def_readonly("n", &pyengine::F32Weight::n);
  pybind11::class_<pyengine::DecoderLayer>(m, "DecoderLayer",
                                           "A decoder layer's weights (Int8Weight, Bf16Weight, FloatWeight or "
                                           "F32Weight linears) for decoder_step.")
      .def(pybind11::init([](pyengine::StepWeight qkv, pyengine::StepWeight self_out, pyengine::StepWeight cross_q,
                             pyengine::StepWeight cross_out, pyengine::StepWeight fc1, pyengine::StepWeight fc2,
                             std::vector<at::Tensor> norms, double eps, bool pre_norm, std::string activation,
                             int64_t heads, bool aten_norm) {
             TORCH_CHECK(norms.size() == 6, "DecoderLayer: six layer-norm tensors (w, b of self, cross, ffn)");
             TORCH_CHECK(activation == "relu" || activation == "swish" || activation == "gelu",
                         "DecoderLayer: activation must be relu, swish or gelu, not ", activation);
             for (const auto* w : {&self_out, &cross_q, &cross_out, &fc1, &fc2})
               TORCH_CHECK(w->index() == qkv.index(), "DecoderLayer: every linear must have one weight type");
             return pyengine::DecoderLayer{qkv, self_out, cross_q, cross_out, fc1, fc2, norms[0], norms[1],
                                           norms[2], norms[3], norms[4], norms[5], eps, pre_norm, activation, heads,
                                           aten_norm};
           }),
           pybind11::arg("qkv"), pybind11::arg("self_out"), pybind11::arg("cross_q"), pybind11::arg("cross_out"),
           pybind11::arg("fc1"), pybind11::arg("fc2"), pybind11::arg("norms"), pybind11::arg("eps"),
           pybind11::arg("pre_norm"), pybind11::arg("activation"), pybind11::arg("heads"),
           pybind11::arg("aten_norm") = false);
  m.def("decoder_step", &pyengine::decoder_step, nogil,
        "One decoder step of every layer with int8, bf16 or float32 linears (an indirect KV cache, a position per "
        "row), in C++.",
        pybind11::arg("layers"), pybind11::arg("x"), pybind11::arg("cache"), pybind11::arg("positions"),
        pybind11::arg("write_rows"), pybind11::arg("rows"), pybind11::arg("memory"), pybind11::arg("memory_rows"),
        pybind11::arg("src_lengths"), pybind11::arg("kernel") = "auto");
  m.def("write_kv", &pyengine::write_kv, nogil,
        "Each row's K and V (kv (N, 2D) float32) into cache[layer, :, rows[i], :, positions[i]] (float32 or bf16).",
        pybind11::arg("kv"), pybind11::arg("cache"), pybind11::arg("layer"), pybind11::arg("rows"),
        pybind11::arg("positions"));
  pybind11::class_<pyengine::EncoderLayer>(m, "EncoderLayer",
                                           "An encoder layer's weights (Int8Weight, Bf16Weight or F32Weight "
                                           "linears) for encoder_stack.")
      .def(pybind11::init([](pyengine::StepWeight qkv, pyengine::StepWeight out, pyengine::StepWeight fc1,
                             pyengine::StepWeight fc2, std::vector<at::Tensor> norms, double eps, bool pre_norm,
                             std::string activation, int64_t heads, bool aten_norm) {
             TORCH_CHECK(norms.size() == 4, "EncoderLayer: four layer-norm tensors (w, b of self, ffn)");
             TORCH_CHECK(activation == "relu" || activation == "swish" || activation == "gelu",
                         "EncoderLayer: activation must be relu, swish or gelu, not ", activation);
             TORCH_CHECK(!std::holds_alternative<pyengine::FloatWeight>(qkv),
                         "EncoderLayer: PyTorch's float32 linears run the Python layers");
             for (const auto* w : {&out, &fc1, &fc2})
               TORCH_CHECK(w->index() == qkv.index(), "EncoderLayer: every linear must have one weight type");
             return pyengine::EncoderLayer{qkv,      out,      fc1,      fc2,        norms[0], norms[1], norms[2],
                                           norms[3], eps,      pre_norm, activation, heads,    aten_norm};
           }),
           pybind11::arg("qkv"), pybind11::arg("out"), pybind11::arg("fc1"), pybind11::arg("fc2"),
           pybind11::arg("norms"), pybind11::arg("eps"), pybind11::arg("pre_norm"), pybind11::arg("activation"),
           pybind11::arg("heads"), pybind11::arg("aten_norm") = false);
  m.def("encoder_stack", &pyengine::encoder_stack, nogil,
        "Every encoder layer with int8, bf16 or float32 linears over B sentences' tokens one after the other, in C++.",
        pybind11::arg("layers"), pybind11::arg("x"), pybind11::arg("lengths"), pybind11::arg("kernel") = "auto");
  m.def("bf16_kernel_name", &pyengine::bf16_kernel_name,
        "The tile bf16_linear runs for `kernel` on this CPU: amx, avx512bf16, avx512 or portable.", pybind11::arg("kernel"));
  m.def("bf16_pack", &pyengine::bf16_pack, nogil, "Pack (N, K) weights, rounded to bfloat16, for bf16_linear.",
        pybind11::arg("w"));
  m.def("bf16_split", &pyengine::bf16_split, nogil,
        "x's two bfloat16 terms (hi, lo) as the bf16 GEMM's `kernel` splits them (the same bits from each).",
        pybind11::arg("x"), pybind11::arg("kernel") = "auto");
  m.def("bf16_linear", &pyengine::bf16_linear, nogil,
        "act(x·Wᵀ + bias) with bfloat16 W and float32 x carried as two bf16 terms (AMX-BF16 or AVX-512; CPU).",
        pybind11::arg("x"), pybind11::arg("packed"), pybind11::arg("bias"), pybind11::arg("n_out"),
        pybind11::arg("out") = pybind11::none(), pybind11::arg("kernel") = "auto",
        pybind11::arg("activation") = "none");
  m.def("bf16_linear_log_softmax_topk", &pyengine::bf16_linear_log_softmax_topk, nogil,
        "Each row's k best (log-prob, column) of x·Wᵀ + bias with bfloat16 W (as bf16_linear), the logits never "
        "written; banned columns count in the normalizer but are never candidates.",
        pybind11::arg("x"), pybind11::arg("packed"), pybind11::arg("bias"), pybind11::arg("n_out"), pybind11::arg("k"),
        pybind11::arg("banned"), pybind11::arg("kernel") = "auto");
  m.def("f32_kernel_name", &pyengine::f32_kernel_name,
        "The tile f32_linear runs for `kernel` on this CPU: avx512 or portable.", pybind11::arg("kernel"));
  m.def("f32_pack", &pyengine::f32_pack, nogil, "Pack (N, K) float32 weights for f32_linear.", pybind11::arg("w"));
  m.def("f32_linear", &pyengine::f32_linear, nogil,
        "act(x·Wᵀ + bias) with float32 W and x, each output one FMA chain over k (AVX-512 or portable; CPU).",
        pybind11::arg("x"), pybind11::arg("packed"), pybind11::arg("bias"), pybind11::arg("n_out"),
        pybind11::arg("out") = pybind11::none(), pybind11::arg("kernel") = "auto",
        pybind11::arg("activation") = "none");
  m.def("f32_linear_log_softmax_topk", &pyengine::f32_linear_log_softmax_topk, nogil,
        "Each row's k best (log-prob, column) of x·Wᵀ + bias with float32 W (as f32_linear), the logits never "
        "written; banned columns count in the normalizer but are never candidates.",
        pybind11::arg("x"), pybind11::arg("packed"), pybind11::arg("bias"), pybind11::arg("n_out"), pybind11::arg("k"),
        pybind11::arg("banned"), pybind11::arg("kernel") = "auto");
  m.def("log_softmax_topk", &pyengine::log_softmax_topk, nogil,
        "The k best (log-prob, token) of each row of (N, V) float32 logits, fused; banned ids are never "
        "candidates (and are set to -inf in the logits).",
        pybind11::arg("logits"), pybind11::arg("k"), pybind11::arg("banned"));
}
