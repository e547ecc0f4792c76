// The torch.library schemas of every duodiff op. Implementations register per dispatch key in
// the op family files: <family>.cpp (CPU, Meta) and <family>_cuda.cu (CUDA) for solver_update,
// compaction and timestep_embedding (distinct stems: setuptools names objects after them).
#include <torch/library.h>

#include <sstream>

#include "ops.h"

namespace duodiff {

std::string build_info() {
  std::ostringstream s;
  s << "duodiff_fast._C ops: philox_normal, solver_update, active_indices, gather_rows, "
       "scatter_rows_, timestep_embedding; ";
#ifdef DUODIFF_WITH_CUDA
  s << "cuda=1";
#else
  s << "cuda=0";
#endif
#ifdef DUODIFF_CUDA_ARCHS
#define DUODIFF_STR2(x) #x
#define DUODIFF_STR(x) DUODIFF_STR2(x)
  s << " archs=" << DUODIFF_STR(DUODIFF_CUDA_ARCHS);
#endif
  s << " cxx=" << __cplusplus;
  return s.str();
}

}  // namespace duodiff

TORCH_LIBRARY(duodiff, m) {
  // (B, *sample_shape) standard normals: row b from Philox stream (seeds[b], step).
  m.def("philox_normal(Tensor seeds, int step, int[] sample_shape, ScalarType dtype) -> Tensor");
  // a*x + b*eps + c*z with (a, b, c) = coefs read on the device, z = philox_normal(seeds, step)
  // (no noise when seeds is None).
  m.def("solver_update(Tensor x, Tensor eps, Tensor coefs, Tensor? seeds, int step) -> Tensor");
  // Positions of the True entries of a (B,) bool mask, ascending, int64.
  m.def("active_indices(Tensor keep) -> Tensor");
  // Rows `index` of each (B, ...) tensor, as new contiguous (K, ...) tensors.
  m.def("gather_rows(Tensor[] tensors, Tensor index) -> Tensor[]");
  // dst[index[k]] = src[k] in place; returns dst.
  m.def("scatter_rows_(Tensor(a!) dst, Tensor index, Tensor src) -> Tensor(a!)");
  // (B, dim) float32 [cos | sin] sinusoidal embedding (odd dim: one trailing zero column).
  m.def("timestep_embedding(Tensor timesteps, int dim, float max_period=10000.0) -> Tensor");
}
