// Declarations shared by the op families of duodiff_fast._C (see registry.cpp for the schemas).
#pragma once
#include <ATen/ATen.h>

#include <string>
#include <vector>

namespace duodiff {

// Shape checks shared by the CPU, CUDA and Meta implementations.
void check_solver_update_args(const at::Tensor& x, const at::Tensor& eps, const at::Tensor& coefs,
                              const c10::optional<at::Tensor>& seeds);
void check_seeds(const at::Tensor& seeds);
std::vector<int64_t> noise_shape(const at::Tensor& seeds, at::IntArrayRef sample_shape);
void check_rows_index(const at::Tensor& index);

// Multiprocessors of the current CUDA device (CUDA builds only; cached per device).
int sm_count();

// Build information (compiler, CUDA, architectures): used by the C++ test and the Python module.
std::string build_info();

}  // namespace duodiff
