// pyengine._C: the C++ side of the engine. This build carries only the module skeleton and a build
// probe; KV-cache and beam-search ops (kv_cache.cpp, beam_search.cpp) land with the csrc issue.
#include <torch/extension.h>

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
}
