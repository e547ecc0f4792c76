// Batch compaction for the shrinking-batch early exit: CPU and Meta kernels (CUDA: compaction_cuda.cu).
// Rows are copied as raw bytes, so every dtype is supported.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "ops.h"

namespace duodiff {

void check_rows_index(const at::Tensor& index) {
  TORCH_CHECK(index.dim() == 1, "index must have shape (K,), got ", index.sizes());
  TORCH_CHECK(index.scalar_type() == at::kLong || index.scalar_type() == at::kInt,
              "index must be int64 or int32, got ", index.scalar_type());
}

namespace {

void check_keep(const at::Tensor& keep) {
  TORCH_CHECK(keep.dim() == 1 && keep.scalar_type() == at::kBool, "keep must be a 1-D bool mask, got shape ",
              keep.sizes(), " dtype ", keep.scalar_type());
}

at::Tensor active_indices_cpu(const at::Tensor& keep) {
  check_keep(keep);
  auto k = keep.contiguous();
  const bool* p = k.data_ptr<bool>();
  int64_t count = 0;
  for (int64_t i = 0; i < k.size(0); ++i) count += p[i] ? 1 : 0;
  auto out = at::empty({count}, keep.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t i = 0, j = 0; i < k.size(0); ++i) {
    if (p[i]) o[j++] = i;
  }
  return out;
}

std::vector<int64_t> index_values(const at::Tensor& index, int64_t rows) {
  auto idx = index.to(at::kLong).contiguous();
  const int64_t* p = idx.data_ptr<int64_t>();
  std::vector<int64_t> v(p, p + idx.numel());
  for (auto i : v) {
    TORCH_CHECK_INDEX(i >= 0 && i < rows, "row index ", i, " out of range for a tensor with ", rows, " rows");
  }
  return v;
}

void copy_rows(const char* src, char* dst, const std::vector<int64_t>& src_rows,
               const std::vector<int64_t>& dst_rows, int64_t row_bytes) {
  const int64_t n = static_cast<int64_t>(src_rows.size());
  at::parallel_for(0, n, 16, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      std::memcpy(dst + dst_rows[k] * row_bytes, src + src_rows[k] * row_bytes, row_bytes);
    }
  });
}

std::vector<int64_t> iota(int64_t n) {
  std::vector<int64_t> v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = i;
  return v;
}

std::vector<at::Tensor> gather_rows_cpu(at::TensorList tensors, const at::Tensor& index) {
  check_rows_index(index);
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (const auto& t : tensors) {
    TORCH_CHECK(t.dim() >= 1, "gather_rows: every tensor must have a batch dimension");
    auto src = t.contiguous();
    auto rows = index_values(index, src.size(0));
    auto shape = src.sizes().vec();
    shape[0] = static_cast<int64_t>(rows.size());
    auto dst = at::empty(shape, src.options());
    const int64_t row_bytes = src.size(0) ? src.nbytes() / src.size(0) : 0;
    if (row_bytes) {
      copy_rows(static_cast<const char*>(src.data_ptr()), static_cast<char*>(dst.data_ptr()), rows,
                iota(rows.size()), row_bytes);
    }
    out.push_back(dst);
  }
  return out;
}

void check_scatter(const at::Tensor& dst, const at::Tensor& index, const at::Tensor& src) {
  check_rows_index(index);
  TORCH_CHECK(src.dim() == dst.dim() && src.size(0) == index.size(0) && src.sizes().slice(1) == dst.sizes().slice(1),
              "src of shape ", src.sizes(), " does not fit rows ", index.sizes(), " of dst ", dst.sizes());
}

at::Tensor& scatter_rows_cpu(at::Tensor& dst, const at::Tensor& index, const at::Tensor& src) {
  check_scatter(dst, index, src);
  auto rows = index_values(index, dst.size(0));
  auto s = src.to(dst.scalar_type()).contiguous();
  if (!dst.is_contiguous()) {  // rare: fall back to ATen for strided destinations
    dst.index_copy_(0, index.to(at::kLong), s);
    return dst;
  }
  const int64_t row_bytes = dst.size(0) ? dst.nbytes() / dst.size(0) : 0;
  if (row_bytes && !rows.empty()) {
    copy_rows(static_cast<const char*>(s.data_ptr()), static_cast<char*>(dst.data_ptr()), iota(rows.size()),
              rows, row_bytes);
  }
  return dst;
}

std::vector<at::Tensor> gather_rows_meta(at::TensorList tensors, const at::Tensor& index) {
  check_rows_index(index);
  std::vector<at::Tensor> out;
  for (const auto& t : tensors) {
    auto shape = t.sizes().vec();
    shape[0] = index.size(0);
    out.push_back(at::empty(shape, t.options()));
  }
  return out;
}

at::Tensor& scatter_rows_meta(at::Tensor& dst, const at::Tensor& index, const at::Tensor& src) {
  check_scatter(dst, index, src);
  return dst;
}

}  // namespace

TORCH_LIBRARY_IMPL(duodiff, CPU, m) {
  m.impl("active_indices", &active_indices_cpu);
  m.impl("gather_rows", &gather_rows_cpu);
  m.impl("scatter_rows_", &scatter_rows_cpu);
}

TORCH_LIBRARY_IMPL(duodiff, Meta, m) {
  m.impl("gather_rows", &gather_rows_meta);
  m.impl("scatter_rows_", &scatter_rows_meta);
}

}  // namespace duodiff
