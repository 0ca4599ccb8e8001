// pyengine._C: the C++ side of the engine: the functions of csrc/*.cpp, nothing else.
#include <torch/extension.h>

#include "beam_search.h"

namespace pyengine {

// Which optional parts were compiled in, so Python can report backends without guessing.
pybind11::dict build_info() {
  pybind11::dict info;
#ifdef PYENGINE_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  info["torch_version"] = TORCH_VERSION;
  return info;
}

}  // namespace pyengine

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pyengine C++ extension";
  m.def("build_info", &pyengine::build_info, "What this build of pyengine._C contains.");
  m.def("beam_step", &pyengine::beam_step, "One HF-rule beam-search step; updates the state in place.",
        pybind11::arg("cand_logp"), pybind11::arg("cand_ids"), pybind11::arg("run_scores"), pybind11::arg("run_hist"),
        pybind11::arg("fin_scores"), pybind11::arg("fin_hist"), pybind11::arg("fin_len"), pybind11::arg("fin_flag"),
        pybind11::arg("open"), pybind11::arg("step"), pybind11::arg("length_penalty"),
        pybind11::arg("early_stopping"), pybind11::arg("eos"));
}
