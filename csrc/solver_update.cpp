// Philox noise and the fused solver update x_next = a*x + b*eps + c*z: CPU and Meta kernels.
// The CUDA kernels are in solver_update_cuda.cu; both use the stream of philox.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ops.h"
#include "philox.h"

namespace duodiff {

void check_seeds(const at::Tensor& seeds) {
  TORCH_CHECK(seeds.dim() == 1, "seeds must have shape (B,), got ", seeds.sizes());
  TORCH_CHECK(seeds.scalar_type() == at::kLong, "seeds must be int64, got ", seeds.scalar_type());
}

std::vector<int64_t> noise_shape(const at::Tensor& seeds, at::IntArrayRef sample_shape) {
  check_seeds(seeds);
  std::vector<int64_t> shape{seeds.size(0)};
  for (auto s : sample_shape) {
    TORCH_CHECK(s >= 0, "sample_shape must be non-negative, got ", sample_shape);
    shape.push_back(s);
  }
  return shape;
}

void check_solver_update_args(const at::Tensor& x, const at::Tensor& eps, const at::Tensor& coefs,
                              const c10::optional<at::Tensor>& seeds) {
  TORCH_CHECK(x.dim() >= 1 && x.size(0) >= 0, "x must have shape (B, ...), got ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(eps.sizes() == x.sizes(), "eps must have the shape of x ", x.sizes(), ", got ", eps.sizes());
  TORCH_CHECK(coefs.numel() == 3 && at::isFloatingType(coefs.scalar_type()),
              "coefs must be 3 floating values (a, b, c), got shape ", coefs.sizes(), " dtype ",
              coefs.scalar_type());
  TORCH_CHECK(coefs.device() == x.device() || coefs.device().is_cpu(),
              "coefs must lie on x's device or the CPU");
  if (seeds.has_value()) {
    check_seeds(*seeds);
    TORCH_CHECK(seeds->size(0) == x.size(0), "seeds must hold one seed per row of x (", x.size(0),
                "), got ", seeds->size(0));
  }
}

namespace {

// Elements [4g, 4g + 4) of every sample: the normals of Philox group g.
template <typename scalar_t>
void fill_cpu(const int64_t* seeds, int64_t step, int64_t rows, int64_t per_row, const scalar_t* x,
              const scalar_t* eps, double a, double b, double c, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t groups = (per_row + 3) / 4;
  at::parallel_for(0, rows * groups, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t row = i / groups, g = i % groups;
      float z[4] = {0.f, 0.f, 0.f, 0.f};
      if (seeds != nullptr && c != 0.0) {
        philox_normal4(static_cast<uint64_t>(seeds[row]), static_cast<uint64_t>(step),
                       static_cast<uint64_t>(g), z);
      }
      const int64_t base = row * per_row + 4 * g;
      const int64_t n = std::min<int64_t>(4, per_row - 4 * g);
      for (int64_t j = 0; j < n; ++j) {
        if (x == nullptr) {
          out[base + j] = static_cast<scalar_t>(z[j]);
        } else {
          const acc_t v = static_cast<acc_t>(a) * static_cast<acc_t>(x[base + j]) +
                          static_cast<acc_t>(b) * static_cast<acc_t>(eps[base + j]) +
                          static_cast<acc_t>(c) * static_cast<acc_t>(z[j]);
          out[base + j] = static_cast<scalar_t>(v);
        }
      }
    }
  });
}

at::Tensor philox_normal_cpu(const at::Tensor& seeds, int64_t step, at::IntArrayRef sample_shape,
                             at::ScalarType dtype) {
  auto shape = noise_shape(seeds, sample_shape);
  TORCH_CHECK(at::isFloatingType(dtype), "dtype must be floating point, got ", dtype);
  auto out = at::empty(shape, seeds.options().dtype(dtype));
  auto s = seeds.contiguous();
  const int64_t rows = shape[0];
  const int64_t per_row = rows ? out.numel() / rows : 0;
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "philox_normal_cpu", [&] {
    fill_cpu<scalar_t>(s.data_ptr<int64_t>(), step, rows, per_row, nullptr, nullptr, 0.0, 0.0, 1.0,
                       out.data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor solver_update_cpu(const at::Tensor& x, const at::Tensor& eps, const at::Tensor& coefs,
                             const c10::optional<at::Tensor>& seeds, int64_t step) {
  check_solver_update_args(x, eps, coefs, seeds);
  auto xc = x.contiguous();
  auto ec = eps.to(x.scalar_type()).contiguous();
  auto cf = coefs.to(at::kCPU, at::kDouble).contiguous();
  const double* k = cf.data_ptr<double>();
  auto out = at::empty_like(xc);
  const int64_t rows = x.size(0);
  if (out.numel() == 0) return out;
  const int64_t per_row = out.numel() / rows;
  const int64_t* sp = nullptr;
  at::Tensor sc;
  if (seeds.has_value()) {
    sc = seeds->contiguous();
    sp = sc.data_ptr<int64_t>();
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "solver_update_cpu", [&] {
    fill_cpu<scalar_t>(sp, step, rows, per_row, xc.data_ptr<scalar_t>(), ec.data_ptr<scalar_t>(), k[0],
                       k[1], k[2], out.data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor philox_normal_meta(const at::Tensor& seeds, int64_t step, at::IntArrayRef sample_shape,
                              at::ScalarType dtype) {
  return at::empty(noise_shape(seeds, sample_shape), seeds.options().dtype(dtype));
}

at::Tensor solver_update_meta(const at::Tensor& x, const at::Tensor& eps, const at::Tensor& coefs,
                              const c10::optional<at::Tensor>& seeds, int64_t step) {
  check_solver_update_args(x, eps, coefs, seeds);
  return at::empty_like(x, at::MemoryFormat::Contiguous);
}

}  // namespace

TORCH_LIBRARY_IMPL(duodiff, CPU, m) {
  m.impl("philox_normal", &philox_normal_cpu);
  m.impl("solver_update", &solver_update_cpu);
}

TORCH_LIBRARY_IMPL(duodiff, Meta, m) {
  m.impl("philox_normal", &philox_normal_meta);
  m.impl("solver_update", &solver_update_meta);
}

}  // namespace duodiff
