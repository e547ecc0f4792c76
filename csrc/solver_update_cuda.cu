// Philox noise and the fused solver update x_next = a*x + b*eps + c*z: CUDA kernels.
// One thread per group of four consecutive elements of one sample (one Philox call). The
// coefficients are read from device memory, and the step is a kernel argument, so the update
// replays inside a CUDA graph with new seeds (a static seeds buffer) and new coefficients.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ops.h"
#include "philox.h"

namespace duodiff {

int sm_count() {
  // No ATen/cuda/CUDAContext.h here: it pulls in cuBLAS/cuSPARSE headers that a minimal toolkit lacks.
  static int cached[64] = {0};
  const int dev = c10::cuda::current_device();
  if (dev < 0 || dev >= 64) return 132;
  if (cached[dev] == 0) {
    int n = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
    cached[dev] = n > 0 ? n : 1;
  }
  return cached[dev];
}

namespace {

constexpr int kThreads = 256;

template <typename scalar_t, bool kHasX>
__global__ void fused_update_kernel(const int64_t* __restrict__ seeds, uint64_t step, int64_t rows,
                                    int64_t per_row, int64_t groups, const scalar_t* __restrict__ x,
                                    const scalar_t* __restrict__ eps, const double* __restrict__ coefs,
                                    scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total = rows * groups;
  acc_t a = 0, b = 0, c = 1;
  if (kHasX) {
    a = static_cast<acc_t>(coefs[0]);
    b = static_cast<acc_t>(coefs[1]);
    c = static_cast<acc_t>(coefs[2]);
  }
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / groups, g = i - row * groups;
    float z[4] = {0.f, 0.f, 0.f, 0.f};
    if (seeds != nullptr && c != acc_t(0)) {
      philox_normal4(static_cast<uint64_t>(seeds[row]), step, static_cast<uint64_t>(g), z);
    }
    const int64_t base = row * per_row + 4 * g;
    const int64_t n = per_row - 4 * g < 4 ? per_row - 4 * g : 4;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (j < n) {
        if (kHasX) {
          const acc_t v = a * static_cast<acc_t>(x[base + j]) + b * static_cast<acc_t>(eps[base + j]) +
                          c * static_cast<acc_t>(z[j]);
          out[base + j] = static_cast<scalar_t>(v);
        } else {
          out[base + j] = static_cast<scalar_t>(z[j]);
        }
      }
    }
  }
}

int blocks_for(int64_t total) {
  const int sms = sm_count();
  const int64_t want = (total + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(sms) * 16;  // grid-stride beyond 16 blocks per SM
  return static_cast<int>(std::max<int64_t>(1, std::min(want, cap)));
}

at::Tensor philox_normal_cuda(const at::Tensor& seeds, int64_t step, at::IntArrayRef sample_shape,
                              at::ScalarType dtype) {
  auto shape = noise_shape(seeds, sample_shape);
  TORCH_CHECK(at::isFloatingType(dtype), "dtype must be floating point, got ", dtype);
  c10::cuda::CUDAGuard guard(seeds.device());
  auto out = at::empty(shape, seeds.options().dtype(dtype));
  if (out.numel() == 0) return out;
  auto s = seeds.contiguous();
  const int64_t rows = shape[0], per_row = out.numel() / rows, groups = (per_row + 3) / 4;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "philox_normal_cuda", [&] {
    fused_update_kernel<scalar_t, false><<<blocks_for(rows * groups), kThreads, 0, stream>>>(
        s.data_ptr<int64_t>(), static_cast<uint64_t>(step), rows, per_row, groups, nullptr, nullptr,
        nullptr, out.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor solver_update_cuda(const at::Tensor& x, const at::Tensor& eps, const at::Tensor& coefs,
                              const c10::optional<at::Tensor>& seeds, int64_t step) {
  check_solver_update_args(x, eps, coefs, seeds);
  TORCH_CHECK(x.is_cuda() && eps.is_cuda(), "x and eps must be CUDA tensors");
  c10::cuda::CUDAGuard guard(x.device());
  auto xc = x.contiguous();
  auto ec = eps.to(x.scalar_type()).contiguous();
  // coefs stay on the device (a static buffer under CUDA graphs); a CPU coefs tensor is copied.
  auto cf = coefs.to(x.device(), at::kDouble).contiguous();
  auto out = at::empty_like(xc);
  if (out.numel() == 0) return out;
  const int64_t rows = x.size(0), per_row = out.numel() / rows, groups = (per_row + 3) / 4;
  const int64_t* sp = nullptr;
  at::Tensor sc;
  if (seeds.has_value()) {
    TORCH_CHECK(seeds->device() == x.device(), "seeds must lie on x's device");
    sc = seeds->contiguous();
    sp = sc.data_ptr<int64_t>();
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "solver_update_cuda", [&] {
    fused_update_kernel<scalar_t, true><<<blocks_for(rows * groups), kThreads, 0, stream>>>(
        sp, static_cast<uint64_t>(step), rows, per_row, groups, xc.data_ptr<scalar_t>(),
        ec.data_ptr<scalar_t>(), cf.data_ptr<double>(), out.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(duodiff, CUDA, m) {
  m.impl("philox_normal", &philox_normal_cuda);
  m.impl("solver_update", &solver_update_cuda);
}

}  // namespace duodiff
