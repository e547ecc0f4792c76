// Sinusoidal timestep embedding: CUDA kernel, one thread per output element.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>

#include "ops.h"
#include "timestep_embedding.h"

namespace duodiff {
namespace {

__global__ void timestep_embedding_kernel(const float* __restrict__ t, int64_t rows, int64_t dim, int64_t half,
                                          float neg_log_max_period, float* __restrict__ out) {
  const int64_t total = rows * dim;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = timestep_embedding_value(t[i / dim], i % dim, half, neg_log_max_period);
  }
}

at::Tensor timestep_embedding_cuda(const at::Tensor& timesteps, int64_t dim, double max_period) {
  TORCH_CHECK(timesteps.dim() == 1, "timesteps must have shape (B,), got ", timesteps.sizes());
  TORCH_CHECK(dim >= 1, "dim must be positive, got ", dim);
  c10::cuda::CUDAGuard guard(timesteps.device());
  auto t = timesteps.to(at::kFloat).contiguous();
  const int64_t rows = t.size(0);
  auto out = at::empty({rows, dim}, t.options());
  if (out.numel() == 0) return out;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((out.numel() + threads - 1) / threads, 65535);
  timestep_embedding_kernel<<<static_cast<int>(blocks), threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      t.data_ptr<float>(), rows, dim, dim / 2, static_cast<float>(-std::log(max_period)), out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(duodiff, CUDA, m) { m.impl("timestep_embedding", &timestep_embedding_cuda); }

}  // namespace duodiff
