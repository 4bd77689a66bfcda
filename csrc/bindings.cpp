// The pybind11 side of kfac_ext._C: build information only. Ops live in the dispatcher
// (registration.cpp); keeping pybind11 out of the op files keeps their compile times low.
#include <pybind11/pybind11.h>

#include <string>

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
#ifdef KFAC_EXT_WITH_CUDA
  info["built_with_cuda"] = true;
  info["cuda_archs"] = std::string(KFAC_EXT_CUDA_ARCHS);
#else
  info["built_with_cuda"] = false;
  info["cuda_archs"] = std::string();
#endif
  info["torch_version"] = std::string(KFAC_EXT_TORCH_VERSION);
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "kfac_ext native ops (registered under torch.ops.kfac_ext) and build information";
  m.def("build_info", &build_info,
        "dict(built_with_cuda, cuda_archs, torch_version): how this extension was compiled");
}
