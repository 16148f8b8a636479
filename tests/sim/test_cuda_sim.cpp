// Self-test of csrc/sim/cuda_sim.h (the CPU emulation of CUDA kernels).
//
// Build (see run_sim_selftest.sh):
//   g++ -std=c++17 -O1 -DCAE_SIM -I<repo> tests/sim/test_cuda_sim.cpp
// Usage:
//   test_cuda_sim            run every check, print "N passed, M failed"
//   test_cuda_sim --race            launch only a kernel missing a __syncthreads
//   test_cuda_sim --race-warp       launch only a kernel missing a __syncwarp
//                                   (ThreadSanitizer must report both)
//   test_cuda_sim --asan-overrun    write past dynamic shared memory (ASan must report)
//   test_cuda_sim --stack-overflow  overflow a fiber stack (must crash on the guard page)
//   test_cuda_sim --bench [reps]    time a 128-block, 256-thread 3x3 convolution
#include "csrc/cuda/common.cuh"
#include "tests/sim/sim_kernels.cuh"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

// ---------------------------------------------------------------------------
// Minimal test harness
// ---------------------------------------------------------------------------
static int g_failures_in_test = 0;
#define CHECK(cond)                                                      \
  do {                                                                   \
    if (!(cond)) {                                                       \
      std::printf("    CHECK failed at line %d: %s\n", __LINE__, #cond); \
      ++g_failures_in_test;                                              \
    }                                                                    \
  } while (0)

// Runs `f`, expects a std::runtime_error whose message contains every needle.
static void expect_error(const std::function<void()>& f, std::vector<std::string> needles) {
  try {
    f();
  } catch (const std::runtime_error& e) {
    const std::string msg = e.what();
    std::printf("      -> %s\n", msg.c_str());
    for (const std::string& n : needles)
      if (msg.find(n) == std::string::npos) {
        std::printf("    error message lacks '%s': %s\n", n.c_str(), msg.c_str());
        ++g_failures_in_test;
      }
    return;
  }
  std::printf("    expected a std::runtime_error, none thrown\n");
  ++g_failures_in_test;
}

template <class T>
static void conv3x3_reference(const std::vector<T>& x, const std::vector<T>& w, const std::vector<T>& b,
                              std::vector<T>& y, int N, int Cin, int H, int W, int Cout, int S) {
  const int Ho = (H - 1) / S + 1, Wo = (W - 1) / S + 1;
  y.assign(static_cast<size_t>(N) * Cout * Ho * Wo, T(0));
  for (int n = 0; n < N; ++n)
    for (int co = 0; co < Cout; ++co)
      for (int oy = 0; oy < Ho; ++oy)
        for (int ox = 0; ox < Wo; ++ox) {
          T acc = b[co];
          for (int ci = 0; ci < Cin; ++ci)
            for (int ky = 0; ky < 3; ++ky)
              for (int kx = 0; kx < 3; ++kx) {
                const int iy = oy * S - 1 + ky, ix = ox * S - 1 + kx;
                const T v = (iy >= 0 && iy < H && ix >= 0 && ix < W)
                                ? x[((size_t(n) * Cin + ci) * H + iy) * W + ix]
                                : T(0);
                acc += w[(size_t(co) * Cin + ci) * 9 + ky * 3 + kx] * v;
              }
          y[((size_t(n) * Cout + co) * Ho + oy) * Wo + ox] = acc;
        }
}

template <class T, int S>
static double run_conv(int N, int Cin, int H, int W, int Cout, int reps, bool check) {
  const int Ho = (H - 1) / S + 1, Wo = (W - 1) / S + 1;
  std::vector<T> x(size_t(N) * Cin * H * W), w(size_t(Cout) * Cin * 9), b(Cout),
      y(size_t(N) * Cout * Ho * Wo), ref;
  unsigned seed = 12345;
  auto rnd = [&seed] {
    seed = seed * 1664525u + 1013904223u;
    return T(int(seed >> 9) % 2001 - 1000) / T(1000);
  };
  for (T& v : x) v = rnd();
  for (T& v : w) v = rnd();
  for (T& v : b) v = rnd();
  const dim3 grid((Wo + TILE - 1) / TILE, (Ho + TILE - 1) / TILE, N * Cout), block(TILE, TILE);
  const cudaStream_t stream = nullptr;
  const auto t0 = std::chrono::steady_clock::now();
  for (int r = 0; r < reps; ++r)
    CAE_LAUNCH((conv3x3_tiled<T, S>), grid, block, 0, stream, x.data(), w.data(), b.data(), y.data(), Cin, H,
               W, Cout, Ho, Wo);
  const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps;
  if (check) {
    conv3x3_reference(x, w, b, ref, N, Cin, H, W, Cout, S);
    double maxerr = 0;
    for (size_t i = 0; i < y.size(); ++i) maxerr = std::max(maxerr, double(std::fabs(y[i] - ref[i])));
    CHECK(maxerr < 1e-5);
  }
  return sec;
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------
static void test_indices() {
  const dim3 cases[][2] = {{dim3(3), dim3(37)}, {dim3(2, 3), dim3(8, 5)}, {dim3(2, 2, 3), dim3(4, 3, 5)}};
  for (auto& c : cases) {
    const dim3 g = c[0], b = c[1];
    const unsigned threads = b.x * b.y * b.z, blocks = g.x * g.y * g.z;
    std::vector<Rec> out(threads * blocks);
    CAE_LAUNCH(record_indices, g, b, 0, 0, out.data());
    for (unsigned bz = 0; bz < g.z; ++bz)
      for (unsigned by = 0; by < g.y; ++by)
        for (unsigned bx = 0; bx < g.x; ++bx)
          for (unsigned tz = 0; tz < b.z; ++tz)
            for (unsigned ty = 0; ty < b.y; ++ty)
              for (unsigned tx = 0; tx < b.x; ++tx) {
                const Rec& r = out[(bx + g.x * (by + g.y * bz)) * threads + tx + b.x * (ty + b.y * tz)];
                CHECK(r.t.x == tx && r.t.y == ty && r.t.z == tz);
                CHECK(r.b.x == bx && r.b.y == by && r.b.z == bz);
                CHECK(r.bd.x == b.x && r.bd.y == b.y && r.bd.z == b.z);
                CHECK(r.gd.x == g.x && r.gd.y == g.y && r.gd.z == g.z);
              }
  }
}

static void test_block_reduction() {
  std::vector<float> x(4 * 256);
  for (size_t i = 0; i < x.size(); ++i) x[i] = float(i % 97);
  std::vector<float> out(4);
  CAE_LAUNCH((block_sum<float, 256>), 4, 256, 0, 0, x.data(), out.data());
  for (int b = 0; b < 4; ++b) {
    float ref = 0;
    for (int i = 0; i < 256; ++i) ref += x[b * 256 + i];
    CHECK(out[b] == ref);
  }
  std::vector<long long> xl(3 * 128), ol(3);
  for (size_t i = 0; i < xl.size(); ++i) xl[i] = 1000000007LL * i;
  CAE_LAUNCH((block_sum<long long, 128>), 3, 128, 0, 0, xl.data(), ol.data());
  for (int b = 0; b < 3; ++b) {
    long long ref = 0;
    for (int i = 0; i < 128; ++i) ref += xl[b * 128 + i];
    CHECK(ol[b] == ref);
  }
}

static std::vector<float> missing_barrier_inputs() {
  std::vector<float> x(2 * 256);
  for (size_t i = 0; i < x.size(); ++i) x[i] = 1.0f + float(i % 256);
  return x;
}

[[maybe_unused]] static void test_missing_barrier_detected() {  // not run under TSan
  const std::vector<float> x = missing_barrier_inputs();
  const float correct = 256.0f * 257.0f / 2.0f;
  bool wrong_somewhere = false;
  for (const char* sched : {"forward", "reverse"}) {
    cae_sim::set_schedule(sched);
    std::vector<float> out(2);
    CAE_LAUNCH(block_sum_missing_barrier, 2, 256, 0, 0, x.data(), out.data());
    const bool wrong = out[0] != correct || out[1] != correct;
    std::printf("    schedule %-7s -> %s (%g, %g; correct %g)\n", sched, wrong ? "WRONG" : "right", out[0],
                out[1], correct);
    wrong_somewhere |= wrong;
  }
  cae_sim::set_schedule(nullptr);
  CHECK(wrong_somewhere);
  std::vector<float> out(2);  // the fixed kernel is right under the same schedules
  for (const char* sched : {"forward", "reverse", "shuffle:7"}) {
    cae_sim::set_schedule(sched);
    CAE_LAUNCH((block_sum<float, 256>), 2, 256, 0, 0, x.data(), out.data());
    CHECK(out[0] == correct && out[1] == correct);
  }
  cae_sim::set_schedule(nullptr);
}

// Blocks run in the schedule's order too (a GPU runs them in any order): forward
// in index order, reverse the other way, shuffled in some other permutation.
static void test_block_order() {
  const dim3 grid(5, 3, 2);
  const unsigned n = grid.x * grid.y * grid.z;
  for (const char* sched : {"forward", "reverse", "shuffle:7"}) {
    cae_sim::set_schedule(sched);
    std::vector<unsigned> tickets(n, n);
    unsigned next = 0;
    CAE_LAUNCH(block_tickets, grid, 32, 0, 0, tickets.data(), &next);
    std::vector<unsigned> sorted = tickets;
    std::sort(sorted.begin(), sorted.end());
    bool forward = true, reverse = true;
    for (unsigned b = 0; b < n; ++b) {
      CHECK(sorted[b] == b);  // every block ran once
      forward &= tickets[b] == b;
      reverse &= tickets[b] == n - 1 - b;
    }
    const std::string s = sched;
    CHECK(forward == (s == "forward") && reverse == (s == "reverse"));
  }
  cae_sim::set_schedule(nullptr);
}

template <class T>
static void check_warp_shuffles() {
  const int n = 2 * 64;
  std::vector<T> x(n), down(n), x32(n), x16(n), scan8(n), b8(n);
  for (int i = 0; i < n; ++i) x[i] = T(i * 3 % 17 + 1);
  CAE_LAUNCH((warp_shuffles<T>), 2, 64, 0, 0, x.data(), down.data(), x32.data(), x16.data(), scan8.data(),
             b8.data());
  for (int i = 0; i < n; ++i) {
    const int w0 = i / 32 * 32, s16 = i / 16 * 16, s8 = i / 8 * 8;
    T sum32 = 0, sum16 = 0, pre = 0;
    for (int j = w0; j < w0 + 32; ++j) sum32 += x[j];
    for (int j = s16; j < s16 + 16; ++j) sum16 += x[j];
    for (int j = s8; j <= i; ++j) pre += x[j];
    if (i % 32 == 0) CHECK(down[i] == sum32);
    CHECK(x32[i] == sum32);
    CHECK(x16[i] == sum16);
    CHECK(scan8[i] == pre);
    CHECK(b8[i] == x[s8 + 3]);
  }
}

static void test_warp_shuffles() {
  check_warp_shuffles<float>();
  check_warp_shuffles<double>();
  check_warp_shuffles<int>();
  check_warp_shuffles<unsigned>();
  check_warp_shuffles<long long>();
  check_warp_shuffles<unsigned long long>();
}

static void test_absent_lane_poison() {
  std::vector<float> f(32), same(32);
  std::vector<double> d(32);
  std::vector<int> i(32);
  std::vector<unsigned long long> u(32);
  CAE_LAUNCH(absent_lanes, 1, 32, 0, 0, f.data(), d.data(), i.data(), u.data(), same.data());
  for (int l = 0; l < 32; ++l) {
    CHECK(std::isnan(f[l]));
    CHECK(std::isnan(d[l]));
    CHECK(static_cast<unsigned>(i[l]) == 0xDEADBEEFu);
    CHECK(u[l] == 0xDEADBEEFDEADBEEFull);
    CHECK(same[l] == 100.0f + float((l & 16) | 1));
  }
}

static void test_votes() {
  const int n = 64;
  std::vector<unsigned> ballot(n);
  std::vector<int> any(n), all(n), none(n), sub(n);
  CAE_LAUNCH(votes, 1, n, 0, 0, ballot.data(), any.data(), all.data(), none.data(), sub.data());
  unsigned expect = 0;
  for (int l = 0; l < 32; l += 3) expect |= 1u << l;
  for (int t = 0; t < n; ++t) {
    CHECK(ballot[t] == expect);
    CHECK(any[t] == 1);
    CHECK(all[t] == 0);
    CHECK(none[t] == 0);
    CHECK(sub[t] == (t % 32 < 8 ? 1 : -1));
  }
  std::vector<int> cnt(200), land(200), lor(200);
  CAE_LAUNCH(sync_counts, 1, 200, 0, 0, cnt.data(), land.data(), lor.data());
  for (int t = 0; t < 200; ++t) CHECK(cnt[t] == 50 && land[t] == 1 && lor[t] == 1);
}

static void test_atomics() {
  float f = 0;
  double d = 0;
  int i = 0, mx = -1, mn = 1;
  unsigned long long u = 0;
  unsigned hits = 0, word = 0;
  const int blocks = 64, threads = 256, total = blocks * threads;
  CAE_LAUNCH(atomics, blocks, threads, 0, 0, &f, &d, &i, &u, &mx, &mn, &hits, &word);
  CHECK(f == float(total));
  CHECK(d == 0.5 * total);
  CHECK(i == 2 * total);
  CHECK(u == 3ull * total);
  CHECK(mx == total - 1);
  CHECK(mn == -(total - 1));
  CHECK(hits == 1 && word == 1);
}

static void test_dynamic_shared() {
  const int n = 50, blocks = 3;
  std::vector<float> out(n * blocks);
  CAE_LAUNCH(dyn_smem, blocks, 64, n * sizeof(float), 0, out.data(), n);
  for (int b = 0; b < blocks; ++b)
    for (int t = 0; t < n; ++t) {
      if (t % 2 == 0)
        CHECK(out[b * n + t] == float(t + b));
      else
        CHECK(std::isnan(out[b * n + t]));  // never written in this block
    }
}

static void test_errors() {
  std::vector<float> fbuf(64);
  std::vector<int> ibuf(64);
  expect_error([&] { CAE_LAUNCH(early_return_before_barrier, 3, 64, 0, 0, fbuf.data()); },
               {"early_return_before_barrier", "block (", "thread (5,0,0)", "__syncthreads"});
  expect_error([&] { CAE_LAUNCH(warp_vs_block_deadlock, 2, 32, 0, 0, ibuf.data()); },
               {"deadlock", "block (", "__syncthreads", "__syncwarp", "thread ("});
  expect_error([&] { CAE_LAUNCH(divergent_barriers, 1, 64, 0, 0, ibuf.data()); },
               {"divergent barriers", "thread ("});
  expect_error([&] { CAE_LAUNCH(lane_not_in_mask, 1, 32, 0, 0, ibuf.data()); },
               {"not in the mask", "thread ("});
  expect_error([&] { CAE_LAUNCH(full_mask_partial_warp, 1, 48, 0, 0, ibuf.data()); }, {"do not exist"});
  expect_error([&] { CAE_LAUNCH(mismatched_warp_intrinsics, 1, 32, 0, 0, ibuf.data()); },
               {"__ballot_sync", "__syncwarp", "mask=0xffffffff"});
  expect_error([&] { CAE_LAUNCH(trap_kernel, 4, 32, 0, 0, ibuf.data()); },
               {"__trap", "block (2,0,0)", "thread (3,0,0)"});
  // invalid configurations
  expect_error([&] { CAE_LAUNCH(noarg_kernel, 0, 32, 0, 0); }, {"invalid configuration", "noarg_kernel"});
  expect_error([&] { CAE_LAUNCH(noarg_kernel, dim3(1, 0), 32, 0, 0); }, {"invalid configuration"});
  expect_error([&] { CAE_LAUNCH(noarg_kernel, 1, 2048, 0, 0); }, {"invalid configuration", "1024"});
  expect_error([&] { CAE_LAUNCH(noarg_kernel, 1, dim3(32, 32, 2), 0, 0); }, {"invalid configuration"});
  expect_error([&] { CAE_LAUNCH(noarg_kernel, 1, 32, 300 * 1024, 0); }, {"invalid configuration", "shared"});
  // the emulator is usable again after every error
  test_block_reduction();
}

// A launch with more threads than any before maps larger fiber stacks and
// unmaps the old ones, on which abandoned frames (a trapped block's) keep
// their redzones poisoned: ASan keeps shadow memory through munmap, so the
// old range must be unpoisoned first, or memory mapped there later (by the
// host program) reports stack-buffer-underflow. Checked right after the
// stacks grow, before any fiber starts on the new ones (which may overlap).
static void test_stacks_grow() {
  std::vector<int> ibuf(64);
  expect_error([&] { CAE_LAUNCH(trap_kernel, 4, 32, 0, 0, ibuf.data()); }, {"__trap"});
  auto& state = ::cae_sim::detail::g_state;
  char* old_stacks = state.stacks;
  const size_t old_bytes = state.stack_count * state.stack_stride;
  ::cae_sim::detail::ensure_stacks(state, state.stack_count + 32, state.stack_size);
  CHECK(state.stacks != nullptr);
#if CAE_SIM_ASAN
  CHECK(__asan_region_is_poisoned(old_stacks, old_bytes) == nullptr);
#else
  (void)old_stacks, (void)old_bytes;
#endif
  test_block_reduction();  // the emulator runs on, on the new stacks
}

static void test_params_and_warps() {
  std::vector<int> out(96);
  CAE_LAUNCH(params_are_private, 1, 96, 0, 0, 1000, out.data());
  for (int t = 0; t < 96; ++t) CHECK(out[t] == 1000 + t);
  const dim3 block(8, 4, 3);  // 96 threads = 3 warps; x fastest
  std::vector<unsigned> first(96), lane(96);
  CAE_LAUNCH(warps_in_3d_block, 1, block, 0, 0, first.data(), lane.data());
  for (unsigned l = 0; l < 96; ++l) CHECK(first[l] == l / 32 * 32 && lane[l] == l % 32);
  CAE_LAUNCH(noarg_kernel, 2, 2, 0, 0);
}

static void test_warp_smem_exchange() {
  std::vector<int> out(64);
  CAE_LAUNCH(warp_smem_exchange, 3, 64, 0, 0, out.data(), true);
  for (int t = 0; t < 64; ++t) CHECK(out[t] == (t ^ 1) * 10);
}

static void test_conv() {
  run_conv<float, 1>(2, 3, 37, 29, 4, 1, true);
  run_conv<float, 2>(2, 3, 37, 29, 4, 1, true);
  run_conv<double, 1>(1, 2, 20, 33, 3, 1, true);
  run_conv<double, 2>(1, 2, 20, 33, 3, 1, true);
}

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  if (mode == "--race") {  // for ThreadSanitizer: must be reported as a data race
    const std::vector<float> x = missing_barrier_inputs();
    std::vector<float> out(2);
    CAE_LAUNCH(block_sum_missing_barrier, 2, 256, 0, 0, x.data(), out.data());
    std::printf("missing-barrier kernel ran: %g %g\n", out[0], out[1]);
    return 0;
  }
  if (mode == "--race-warp") {
    std::vector<int> out(64);
    CAE_LAUNCH(warp_smem_exchange, 1, 64, 0, 0, out.data(), false);
    std::printf("missing-__syncwarp kernel ran: %d %d\n", out[0], out[1]);
    return 0;
  }
  if (mode == "--asan-overrun") {
    std::vector<float> out(32);
    CAE_LAUNCH(dyn_smem_overrun, 1, 32, 31 * sizeof(float), 0, out.data());
    std::printf("overrun not detected\n");
    return 0;
  }
  if (mode == "--stack-overflow") {
    std::vector<int> out(32);
    CAE_LAUNCH(stack_hog, 1, 32, 0, 0, out.data(), 4096);
    std::printf("stack overflow not detected\n");
    return 0;
  }
  if (mode == "--bench") {
    run_conv<float, 1>(2, 8, 64, 64, 4, 1, false);  // warm-up (stacks, pages)
    const int reps = argc > 2 ? std::atoi(argv[2]) : 5;
    const double s = run_conv<float, 1>(2, 8, 64, 64, 4, reps, true);  // grid (4,4,8) = 128 blocks of 256
    std::printf("conv3x3 float, 128 blocks x 256 threads, Cin=8, 64x64: %.2f ms per launch\n", s * 1e3);
    return g_failures_in_test ? 1 : 0;
  }
  struct {
    const char* name;
    void (*fn)();
  } tests[] = {
      {"thread/block indices, 1-D/2-D/3-D", test_indices},
      {"shared-memory block reduction", test_block_reduction},
#if !CAE_SIM_TSAN  // under TSan this kernel is run alone, by --race
      {"missing __syncthreads changes the result", test_missing_barrier_detected},
#endif
      {"warp shuffles (down, xor w=32/16, up w=8, idx w=8)", test_warp_shuffles},
      {"shuffle from a lane absent from the mask is poison", test_absent_lane_poison},
      {"ballot / any / all / __syncthreads_count", test_votes},
      {"atomics from many blocks", test_atomics},
      {"blocks run in the schedule's order", test_block_order},
      {"dynamic shared memory, unwritten reads are NaN", test_dynamic_shared},
      {"errors: deadlock, divergence, masks, trap, bad config", test_errors},
      {"private parameters, warps of a 3-D block", test_params_and_warps},
      {"fiber stacks grow, the old ones unpoisoned", test_stacks_grow},
      {"shared-memory exchange ordered by __syncwarp", test_warp_smem_exchange},
      {"templated 3x3 convolution vs naive loop", test_conv},
  };
  int passed = 0, failed = 0;
  for (auto& t : tests) {
    g_failures_in_test = 0;
    try {
      t.fn();
    } catch (const std::exception& e) {
      std::printf("    unexpected exception: %s\n", e.what());
      ++g_failures_in_test;
    }
    std::printf("[%s] %s\n", g_failures_in_test ? "FAIL" : " ok ", t.name);
    (g_failures_in_test ? failed : passed) += 1;
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed ? 1 : 0;
}
