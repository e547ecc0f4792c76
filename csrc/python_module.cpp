// The Python module duodiff_fast._C: ops are reached through torch.ops.duodiff (torch.library);
// pybind11 only carries plain build information.
#include <torch/extension.h>

#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "duodiff_fast native ops (registered as torch.ops.duodiff.*)";
  m.def("build_info", &duodiff::build_info, "How this extension was built");
#ifdef DUODIFF_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
