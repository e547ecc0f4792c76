// Sinusoidal timestep embedding: CPU and Meta kernels (CUDA: timestep_embedding_cuda.cu).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "ops.h"
#include "timestep_embedding.h"

namespace duodiff {
namespace {

void check_args(const at::Tensor& timesteps, int64_t dim) {
  TORCH_CHECK(timesteps.dim() == 1, "timesteps must have shape (B,), got ", timesteps.sizes());
  TORCH_CHECK(dim >= 1, "dim must be positive, got ", dim);
}

at::Tensor timestep_embedding_cpu(const at::Tensor& timesteps, int64_t dim, double max_period) {
  check_args(timesteps, dim);
  auto t = timesteps.to(at::kFloat).contiguous();
  const int64_t rows = t.size(0), half = dim / 2;
  auto out = at::empty({rows, dim}, t.options());
  const float* tp = t.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float nl = static_cast<float>(-std::log(max_period));
  at::parallel_for(0, rows * dim, 4096, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) op[i] = timestep_embedding_value(tp[i / dim], i % dim, half, nl);
  });
  return out;
}

at::Tensor timestep_embedding_meta(const at::Tensor& timesteps, int64_t dim, double max_period) {
  check_args(timesteps, dim);
  return at::empty({timesteps.size(0), dim}, timesteps.options().dtype(at::kFloat));
}

}  // namespace

TORCH_LIBRARY_IMPL(duodiff, CPU, m) { m.impl("timestep_embedding", &timestep_embedding_cpu); }
TORCH_LIBRARY_IMPL(duodiff, Meta, m) { m.impl("timestep_embedding", &timestep_embedding_meta); }

}  // namespace duodiff
