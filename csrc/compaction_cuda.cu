// Batch compaction: CUDA kernels. Rows are copied as raw bytes with the widest access (16, 8, 4 or
// 1 bytes) that the row size and both base pointers allow; one launch per tensor.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ops.h"

namespace duodiff {
namespace {

constexpr int kThreads = 256;

// dst row dst_rows[k] (or k) <- src row src_rows[k] (or k), in units of vec_t.
template <typename vec_t, typename index_t>
__global__ void copy_rows_kernel(const vec_t* __restrict__ src, vec_t* __restrict__ dst,
                                 const index_t* __restrict__ index, int64_t k_rows, int64_t row_vecs,
                                 int64_t n_rows_bound, bool gather) {
  const int64_t total = k_rows * row_vecs;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t k = i / row_vecs, j = i - k * row_vecs;
    const int64_t r = static_cast<int64_t>(index[k]);
    CUDA_KERNEL_ASSERT(r >= 0 && r < n_rows_bound);
    if (gather) {
      dst[k * row_vecs + j] = src[r * row_vecs + j];
    } else {
      dst[r * row_vecs + j] = src[k * row_vecs + j];
    }
  }
}

template <typename vec_t, typename index_t>
void launch_vec(const void* src, void* dst, const index_t* index, int64_t k_rows, int64_t row_bytes,
                int64_t bound, bool gather) {
  const int64_t row_vecs = row_bytes / static_cast<int64_t>(sizeof(vec_t));
  const int64_t total = k_rows * row_vecs;
  if (total == 0) return;
  const int sms = sm_count();
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((total + kThreads - 1) / kThreads, sms * 16)));
  copy_rows_kernel<vec_t, index_t><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      static_cast<const vec_t*>(src), static_cast<vec_t*>(dst), index, k_rows, row_vecs, bound, gather);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename index_t>
void launch(const void* src, void* dst, const index_t* index, int64_t k_rows, int64_t row_bytes, int64_t bound,
            bool gather) {
  const auto aligned = [&](int64_t w) {
    return row_bytes % w == 0 && reinterpret_cast<uintptr_t>(src) % w == 0 && reinterpret_cast<uintptr_t>(dst) % w == 0;
  };
  if (aligned(16)) {
    launch_vec<uint4, index_t>(src, dst, index, k_rows, row_bytes, bound, gather);
  } else if (aligned(8)) {
    launch_vec<uint2, index_t>(src, dst, index, k_rows, row_bytes, bound, gather);
  } else if (aligned(4)) {
    launch_vec<uint32_t, index_t>(src, dst, index, k_rows, row_bytes, bound, gather);
  } else {
    launch_vec<uint8_t, index_t>(src, dst, index, k_rows, row_bytes, bound, gather);
  }
}

void copy_rows_cuda(const at::Tensor& src, at::Tensor& dst, const at::Tensor& index, int64_t row_bytes,
                    int64_t bound, bool gather) {
  auto idx = index.to(src.device()).contiguous();
  if (idx.scalar_type() == at::kLong) {
    launch<int64_t>(src.data_ptr(), dst.data_ptr(), idx.data_ptr<int64_t>(), idx.numel(), row_bytes, bound, gather);
  } else {
    launch<int32_t>(src.data_ptr(), dst.data_ptr(), idx.data_ptr<int32_t>(), idx.numel(), row_bytes, bound, gather);
  }
}

at::Tensor active_indices_cuda(const at::Tensor& keep) {
  TORCH_CHECK(keep.dim() == 1 && keep.scalar_type() == at::kBool, "keep must be a 1-D bool mask, got shape ",
              keep.sizes(), " dtype ", keep.scalar_type());
  c10::cuda::CUDAGuard guard(keep.device());
  // The output length is data dependent: ATen's nonzero (one device-to-host count) is the right tool.
  return at::nonzero(keep).squeeze(1);
}

std::vector<at::Tensor> gather_rows_cuda(at::TensorList tensors, const at::Tensor& index) {
  check_rows_index(index);
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (const auto& t : tensors) {
    TORCH_CHECK(t.dim() >= 1 && t.is_cuda(), "gather_rows: every tensor must be a CUDA tensor (B, ...)");
    c10::cuda::CUDAGuard guard(t.device());
    auto src = t.contiguous();
    auto shape = src.sizes().vec();
    shape[0] = index.size(0);
    auto dst = at::empty(shape, src.options());
    const int64_t row_bytes = src.size(0) ? src.nbytes() / src.size(0) : 0;
    if (row_bytes && index.numel()) copy_rows_cuda(src, dst, index, row_bytes, src.size(0), true);
    out.push_back(dst);
  }
  return out;
}

at::Tensor& scatter_rows_cuda(at::Tensor& dst, const at::Tensor& index, const at::Tensor& src) {
  check_rows_index(index);
  TORCH_CHECK(src.dim() == dst.dim() && src.size(0) == index.size(0) && src.sizes().slice(1) == dst.sizes().slice(1),
              "src of shape ", src.sizes(), " does not fit rows ", index.sizes(), " of dst ", dst.sizes());
  c10::cuda::CUDAGuard guard(dst.device());
  auto s = src.to(dst.device(), dst.scalar_type()).contiguous();
  if (!dst.is_contiguous()) {
    dst.index_copy_(0, index.to(dst.device(), at::kLong), s);
    return dst;
  }
  const int64_t row_bytes = dst.size(0) ? dst.nbytes() / dst.size(0) : 0;
  if (row_bytes && index.numel()) copy_rows_cuda(s, dst, index, row_bytes, dst.size(0), false);
  return dst;
}

}  // namespace

TORCH_LIBRARY_IMPL(duodiff, CUDA, m) {
  m.impl("active_indices", &active_indices_cuda);
  m.impl("gather_rows", &gather_rows_cuda);
  m.impl("scatter_rows_", &scatter_rows_cuda);
}

}  // namespace duodiff
