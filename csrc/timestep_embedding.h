// The sinusoidal timestep embedding of one (row, column), in float, evaluated in the same order of
// float operations as duodiff_fast.models.uvit.timestep_embedding (PyTorch reference):
//   freq_j = exp((-ln(max_period) * j) / half),  arg = t * freq_j,  [cos(arg) | sin(arg)].
#pragma once
#include <cmath>

#if defined(__CUDACC__)
#define DUODIFF_TE_HD __host__ __device__ __forceinline__
#else
#define DUODIFF_TE_HD inline
#endif

namespace duodiff {

DUODIFF_TE_HD float timestep_embedding_value(float t, int64_t col, int64_t half, float neg_log_max_period) {
  if (col >= 2 * half) return 0.f;  // odd width: trailing zero column
  const int64_t j = col < half ? col : col - half;
  const float freq = expf((neg_log_max_period * static_cast<float>(j)) / static_cast<float>(half));
  const float arg = t * freq;
  return col < half ? cosf(arg) : sinf(arg);
}

}  // namespace duodiff
