// Counter-based Philox4x32-10 (Salmon et al., SC'11) and Box-Muller normals, shared by the CPU and
// CUDA implementations so that both produce the same noise for the same (seed, step, element).
//
// Stream layout (also implemented in pure PyTorch by duodiff_fast/samplers/philox.py):
//   key     = (seed & 0xffffffff, seed >> 32)          the sample's own 64-bit seed
//   counter = (g & 0xffffffff, g >> 32, step & 0xffffffff, step >> 32)
// where g = element / 4 is the group of four consecutive elements of one sample's flattened noise.
// One Philox call gives four 32-bit words (w0..w3) -> two Box-Muller pairs:
//   u1 = (w0 + 1) / 2^32 in (0, 1],  u2 = w1 / 2^32,  r = sqrt(-2 ln u1)
//   n0 = r cos(2 pi u2),  n1 = r sin(2 pi u2)   (and the same from w2, w3 for n2, n3)
// The transcendental functions run in double precision and the result is rounded to float, so the
// CPU (glibc) and CUDA (libdevice) results agree to within one float ulp (in practice bit-identical:
// both double results are within ~1 double ulp of the exact value before rounding to float).
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DUODIFF_HD __host__ __device__ __forceinline__
#define DUODIFF_UNROLL _Pragma("unroll")
#else
#define DUODIFF_HD inline
#define DUODIFF_UNROLL
#endif

namespace duodiff {

struct U32x4 {
  uint32_t v[4];
};

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

DUODIFF_HD void mul_hi_lo(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  *lo = static_cast<uint32_t>(p);
}

DUODIFF_HD U32x4 philox_round(U32x4 c, uint32_t k0, uint32_t k1) {
  uint32_t hi0, lo0, hi1, lo1;
  mul_hi_lo(kPhiloxM0, c.v[0], &hi0, &lo0);
  mul_hi_lo(kPhiloxM1, c.v[2], &hi1, &lo1);
  U32x4 r;
  r.v[0] = hi1 ^ c.v[1] ^ k0;
  r.v[1] = lo1;
  r.v[2] = hi0 ^ c.v[3] ^ k1;
  r.v[3] = lo0;
  return r;
}

// Philox4x32 with 10 rounds.
DUODIFF_HD U32x4 philox4x32_10(U32x4 c, uint32_t k0, uint32_t k1) {
DUODIFF_UNROLL
  for (int i = 0; i < 9; ++i) {
    c = philox_round(c, k0, k1);
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return philox_round(c, k0, k1);
}

// The four 32-bit words of group `group` of a sample with `seed` at `step`.
DUODIFF_HD U32x4 philox_words(uint64_t seed, uint64_t step, uint64_t group) {
  U32x4 c;
  c.v[0] = static_cast<uint32_t>(group);
  c.v[1] = static_cast<uint32_t>(group >> 32);
  c.v[2] = static_cast<uint32_t>(step);
  c.v[3] = static_cast<uint32_t>(step >> 32);
  return philox4x32_10(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Four standard normals (float) of group `group`: elements 4*group .. 4*group+3.
DUODIFF_HD void philox_normal4(uint64_t seed, uint64_t step, uint64_t group, float out[4]) {
  const U32x4 w = philox_words(seed, step, group);
  const double inv32 = 2.3283064365386962890625e-10;  // 2^-32
  const double two_pi = 6.283185307179586476925286766559;
DUODIFF_UNROLL
  for (int p = 0; p < 2; ++p) {
    const double u1 = (static_cast<double>(w.v[2 * p]) + 1.0) * inv32;
    const double u2 = static_cast<double>(w.v[2 * p + 1]) * inv32;
    const double r = sqrt(-2.0 * log(u1));
    const double th = two_pi * u2;
    out[2 * p] = static_cast<float>(r * cos(th));
    out[2 * p + 1] = static_cast<float>(r * sin(th));
  }
}

}  // namespace duodiff
