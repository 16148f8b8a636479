#!/usr/bin/env bash
# Builds and runs the cuda_sim self-test in every mode CI uses:
#   plain -O1 with the forward (default), reverse and shuffle schedules,
#   the ucontext switching fallback, AddressSanitizer (+UBSan),
#   ThreadSanitizer (correct kernels: no report; kernels missing a
#   __syncthreads / __syncwarp: a data race must be reported),
#   and, when nvcc is installed, a compile-only check of the same kernels.
# Environment: CXX (default g++), CAE_SIM_BUILD_DIR (default build/sim_selftest),
#              CAE_SIM_SKIP_NVCC=1 to skip the nvcc check,
#              CAE_SIM_TORCH_CHECK=1 (+ PYTHON) to also compile against torch headers.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CXX="${CXX:-g++}"
OUT="${CAE_SIM_BUILD_DIR:-$ROOT/build/sim_selftest}"
mkdir -p "$OUT"
cd "$ROOT"

SRC=tests/sim/test_cuda_sim.cpp
FLAGS=(-std=c++17 -g -O1 -Wall -Wextra -Werror -DCAE_SIM -I"$ROOT")
failures=0
pass() { printf '  %-58s ok\n' "$1"; }
fail() { printf '  %-58s FAILED\n' "$1"; failures=$((failures + 1)); }

# --- build (in parallel) ----------------------------------------------------
echo "building into $OUT"
declare -A BUILD=(
  [plain]=""
  [ucontext]="-DCAE_SIM_USE_UCONTEXT=1"
  [asan]="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"
  [tsan]="-fsanitize=thread"
)
pids=()
for name in "${!BUILD[@]}"; do
  # shellcheck disable=SC2086
  "$CXX" "${FLAGS[@]}" ${BUILD[$name]} "$SRC" -o "$OUT/test_$name" >"$OUT/build_$name.log" 2>&1 &
  pids+=("$!:$name")
done
for p in "${pids[@]}"; do
  if wait "${p%%:*}"; then pass "build ${p#*:}"; else fail "build ${p#*:}"; cat "$OUT/build_${p#*:}.log"; fi
done
[ "$failures" -eq 0 ] || { echo "$failures failure(s)"; exit 1; }

# --- helpers ----------------------------------------------------------------
# run_ok LABEL LOGNAME CMD...: must exit 0 and print "0 failed".
run_ok() {
  local label="$1" log="$OUT/$2.log"; shift 2
  if "$@" >"$log" 2>&1 && grep -q " 0 failed" "$log" && ! grep -q "Sanitizer" "$log"; then
    pass "$label"
  else
    fail "$label"; tail -40 "$log"
  fi
}
# TSan of some toolchains cannot map its shadow under high-entropy ASLR;
# retry without ASLR in that case only.
tsan() {
  local log; log="$(mktemp)"
  "$@" >"$log" 2>&1; local rc=$?
  if grep -q "unexpected memory mapping" "$log"; then
    setarch "$(uname -m)" -R "$@" >"$log" 2>&1; rc=$?
  fi
  cat "$log"; rm -f "$log"; return "$rc"
}
# expect_report LABEL LOGNAME PATTERN CMD...: must exit nonzero and print PATTERN.
expect_report() {
  local label="$1" log="$OUT/$2.log" pattern="$3"; shift 3
  "$@" >"$log" 2>&1; local rc=$?
  if [ "$rc" -ne 0 ] && grep -q -- "$pattern" "$log"; then
    pass "$label"
  else
    fail "$label (rc=$rc)"; tail -40 "$log"
  fi
}

# --- run --------------------------------------------------------------------
echo "running"
run_ok "plain, schedule forward (default)" plain env -u CAE_SIM_SCHEDULE "$OUT/test_plain"
run_ok "plain, schedule reverse" plain_reverse env CAE_SIM_SCHEDULE=reverse "$OUT/test_plain"
run_ok "plain, schedule shuffle:12345" plain_shuffle env CAE_SIM_SCHEDULE=shuffle:12345 "$OUT/test_plain"
# A fiber stack overflow must die on the guard page (a signal), not corrupt memory.
# (the subshell reports the signal into the log instead of the terminal)
( "$OUT/test_plain" --stack-overflow; echo "exit status $?" ) >"$OUT/plain_overflow.log" 2>&1
rc="$(sed -n 's/^exit status //p' "$OUT/plain_overflow.log")"
if [ "${rc:-0}" -ge 128 ] && ! grep -q "not detected" "$OUT/plain_overflow.log"; then
  pass "plain, fiber stack overflow hits the guard page"
else
  fail "plain, fiber stack overflow hits the guard page (rc=$rc)"
fi
run_ok "ucontext fallback, schedule shuffle:7" ucontext env CAE_SIM_SCHEDULE=shuffle:7 "$OUT/test_ucontext"
run_ok "ASan+UBSan, schedule forward" asan env -u CAE_SIM_SCHEDULE "$OUT/test_asan"
run_ok "ASan+UBSan, schedule reverse" asan_reverse env CAE_SIM_SCHEDULE=reverse "$OUT/test_asan"
expect_report "ASan reports a dynamic shared memory overrun" asan_overrun "heap-buffer-overflow" \
  "$OUT/test_asan" --asan-overrun
run_ok "TSan, correct kernels: no report (forward)" tsan tsan env -u CAE_SIM_SCHEDULE "$OUT/test_tsan"
run_ok "TSan, correct kernels: no report (shuffle:99)" tsan_shuffle tsan env CAE_SIM_SCHEDULE=shuffle:99 "$OUT/test_tsan"
expect_report "TSan reports the missing __syncthreads" tsan_race "data race.*block_sum_missing_barrier" \
  tsan "$OUT/test_tsan" --race
expect_report "TSan reports the missing __syncwarp" tsan_race_warp "data race.*warp_smem_exchange" \
  tsan "$OUT/test_tsan" --race-warp

if [ "${CAE_SIM_SKIP_NVCC:-0}" != 1 ] && command -v nvcc >/dev/null 2>&1; then
  if nvcc -std=c++17 -arch=sm_80 -I"$ROOT" -c tests/sim/nvcc_check.cu -o "$OUT/nvcc_check.o" >"$OUT/nvcc.log" 2>&1; then
    pass "nvcc compiles the same kernels (compile only)"
  else
    fail "nvcc compiles the same kernels (compile only)"; cat "$OUT/nvcc.log"
  fi
else
  echo "  (nvcc not found: skipping the nvcc compile check)"
fi

# Optional (about a minute): cuda_sim.h next to the torch headers, both orders.
if [ "${CAE_SIM_TORCH_CHECK:-0}" = 1 ]; then
  PY="${PYTHON:-python3}"
  TORCH_INC="$("$PY" -c 'import torch.utils.cpp_extension as c; print(" ".join("-isystem" + p for p in c.include_paths()))' 2>/dev/null)"
  PY_INC="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
  for order in "" "-DCAE_SIM_FIRST"; do
    # shellcheck disable=SC2086
    if "$CXX" -std=c++20 -O1 -fPIC -Wall -Wextra -Werror -DCAE_SIM $order -I"$ROOT" $TORCH_INC -isystem "$PY_INC" \
        -c tests/sim/torch_include_check.cpp -o "$OUT/torch_check.o" >"$OUT/torch$order.log" 2>&1; then
      pass "compiles with torch headers ${order:-(sim after torch)}"
    else
      fail "compiles with torch headers ${order:-(sim after torch)}"; head -30 "$OUT/torch$order.log"
    fi
  done
fi

if [ "$failures" -eq 0 ]; then echo "cuda_sim self-test: all modes passed"; else echo "cuda_sim self-test: $failures failure(s)"; fi
[ "$failures" -eq 0 ]
