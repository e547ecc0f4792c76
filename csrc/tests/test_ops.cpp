// C++ tests of the duodiff ops through the dispatcher (CPU kernels; CUDA when a device is present),
// run by ctest. Exit code 0 when every check passes.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <string>

#include "../ops.h"
#include "../philox.h"

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  std::printf("%s  %s\n", ok ? "PASS" : "FAIL", what.c_str());
  if (!ok) ++failures;
}

c10::OperatorHandle op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

void test_philox_known_answer() {
  // Known-answer vector of Philox4x32-10 (Random123): counter 0, key 0.
  duodiff::U32x4 c{{0u, 0u, 0u, 0u}};
  auto w = duodiff::philox4x32_10(c, 0u, 0u);
  expect(w.v[0] == 0x6627e8d5u && w.v[1] == 0xe169c58du && w.v[2] == 0xbc57ac4cu && w.v[3] == 0x9b00dbd8u,
         "philox4x32_10 known answer (zero counter and key)");
  duodiff::U32x4 f{{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}};
  w = duodiff::philox4x32_10(f, 0xffffffffu, 0xffffffffu);
  expect(w.v[0] == 0x408f276du && w.v[1] == 0x41c83b0eu && w.v[2] == 0xa20bc7c6u && w.v[3] == 0x6d5451fdu,
         "philox4x32_10 known answer (all-ones counter and key)");
}

void test_philox_normal(c10::Device dev) {
  auto normal = op("duodiff::philox_normal").typed<at::Tensor(const at::Tensor&, int64_t, at::IntArrayRef, at::ScalarType)>();
  auto seeds = at::tensor({int64_t(7), int64_t(123456789012345), int64_t(-5)}, at::kLong).to(dev);
  auto big = normal.call(seeds, 4, {3, 17, 19}, at::kFloat).cpu();
  auto one = normal.call(seeds.slice(0, 1, 2), 4, {3, 17, 19}, at::kFloat).cpu();
  expect(at::equal(big.slice(0, 1, 2), one), "philox_normal: a sample's noise does not depend on its batch");
  auto many = normal.call(at::arange(64, at::kLong).to(dev), 1, {4096}, at::kFloat).cpu().to(at::kDouble);
  const double mean = many.mean().item<double>(), var = many.var().item<double>();
  expect(std::abs(mean) < 0.01 && std::abs(var - 1.0) < 0.02, "philox_normal: mean ~ 0, variance ~ 1");
  auto other_step = normal.call(seeds, 5, {3, 17, 19}, at::kFloat).cpu();
  expect(!at::equal(big, other_step), "philox_normal: another step gives other noise");
}

void test_solver_update(c10::Device dev) {
  auto update = op("duodiff::solver_update")
                    .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      const c10::optional<at::Tensor>&, int64_t)>();
  auto normal = op("duodiff::philox_normal").typed<at::Tensor(const at::Tensor&, int64_t, at::IntArrayRef, at::ScalarType)>();
  auto x = at::randn({5, 3, 7, 9}, at::kFloat).to(dev);
  auto e = at::randn({5, 3, 7, 9}, at::kFloat).to(dev);
  auto coefs = at::tensor({0.9, -0.3, 0.25}, at::kDouble).to(dev);
  auto seeds = at::arange(5, at::kLong).mul(1000003).to(dev);
  auto got = update.call(x, e, coefs, seeds, 11).cpu();
  auto z = normal.call(seeds, 11, {3, 7, 9}, at::kFloat).cpu();
  auto ref = x.cpu() * 0.9 - 0.3 * e.cpu() + 0.25 * z;
  expect(at::allclose(got, ref, 1e-5, 1e-6), "solver_update: a*x + b*eps + c*z");
  auto det = update.call(x, e, coefs, c10::nullopt, 0).cpu();
  expect(at::allclose(det, x.cpu() * 0.9 - 0.3 * e.cpu(), 1e-5, 1e-6), "solver_update without noise");
}

void test_compaction(c10::Device dev) {
  auto active = op("duodiff::active_indices").typed<at::Tensor(const at::Tensor&)>();
  auto gather = op("duodiff::gather_rows").typed<std::vector<at::Tensor>(at::TensorList, const at::Tensor&)>();
  auto scatter = op("duodiff::scatter_rows_").typed<at::Tensor&(at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  auto keep = at::tensor({1, 0, 1, 1, 0, 0, 1}, at::kInt).to(at::kBool).to(dev);
  auto idx = active.call(keep);
  expect(at::equal(idx.cpu(), at::tensor({int64_t(0), int64_t(2), int64_t(3), int64_t(6)}, at::kLong)),
         "active_indices");
  auto h = at::randn({7, 13, 5}, at::kFloat).to(dev);
  auto s = at::randn({7, 3}, at::kDouble).to(dev);
  auto outs = gather.call({h, s}, idx);
  expect(at::equal(outs[0].cpu(), h.cpu().index_select(0, idx.cpu())) &&
             at::equal(outs[1].cpu(), s.cpu().index_select(0, idx.cpu())),
         "gather_rows of two tensors");
  auto dst = at::zeros_like(h);
  scatter.call(dst, idx, outs[0]);
  auto ref = at::zeros_like(h.cpu()).index_copy_(0, idx.cpu(), outs[0].cpu());
  expect(at::equal(dst.cpu(), ref), "scatter_rows_ round trip");
}

void test_timestep_embedding(c10::Device dev) {
  auto emb = op("duodiff::timestep_embedding").typed<at::Tensor(const at::Tensor&, int64_t, double)>();
  auto t = at::tensor({0.0f, 1.5f, 500.25f, 999.0f}, at::kFloat).to(dev);
  const int64_t dim = 33, half = dim / 2;
  auto got = emb.call(t, dim, 10000.0).cpu();
  auto freqs = at::exp(-std::log(10000.0) * at::arange(half, at::kFloat) / half);
  auto args = t.cpu().unsqueeze(1) * freqs.unsqueeze(0);
  auto ref = at::cat({at::cos(args), at::sin(args), at::zeros({4, 1})}, 1);
  expect(got.sizes() == ref.sizes() && at::allclose(got, ref, 0, 2e-4), "timestep_embedding vs ATen (odd dim)");
}

}  // namespace

int main() {
  std::setvbuf(stdout, nullptr, _IONBF, 0);  // keep every line if a check aborts
  std::printf("%s\n", duodiff::build_info().c_str());
  test_philox_known_answer();
  std::vector<c10::Device> devices{c10::Device(c10::kCPU)};
  if (at::hasCUDA()) devices.emplace_back(c10::kCUDA, 0);
  for (const auto& dev : devices) {
    std::printf("-- device %s\n", dev.str().c_str());
    for (auto test : {test_philox_normal, test_solver_update, test_compaction, test_timestep_embedding}) {
      try {
        test(dev);
      } catch (const std::exception& e) {
        expect(false, std::string("exception: ") + e.what());
      }
    }
  }
  std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "OK", failures);
  return failures ? 1 : 0;
}
