#!/usr/bin/env bash
# The one script a GPU machine runs (no network needed): build the CUDA kernels
# for this GPU, run every test marked cuda (the op suite on the cuda backend among
# them), profile a training step per kernel, run the benchmark suite if there is
# one, keep every log, and print a short table last.
#
#   scripts/gpu_check.sh            results in ${OUT:-benchmarks/results/gpu-latest}
#
# Environment: OUT (results folder), PYTHON (default python3), CUDA_HOME (default
# /usr/local/cuda), TORCH_CUDA_ARCH_LIST (default 9.0: H100/H200), MAX_JOBS
# (default: the CPU count), BENCH_ARGS (extra benchmark arguments),
# GPU_CHECK_BUDGET (seconds for the whole script, default 450: it must end within
# 8 minutes; the benchmarks get what the build and tests leave).
#
# Files written (at most 8, flat): build.log (machine, versions, compiler output),
# tests.log (failures, crashes' backtraces and sanitizer reports, then the loss
# curve against PyTorch's and bfloat16 against float32), profile.log (GPU time per
# kernel, Nsight Compute's sections), bench.log, bench.json, report.md and ratios.png
# (benchmarks/report.py), summary.txt (the table printed last).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
OUT_DIR=${OUT:-benchmarks/results/gpu-latest}
BUDGET=${GPU_CHECK_BUDGET:-450}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export FORCE_CUDA=1 PYTHONUNBUFFERED=1
# The package is built in place (nothing installed): every Python this script
# starts, subprocesses of the benchmarks too, imports it from here.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$SECONDS
declare -A status seconds

fail() {
  echo "gpu_check: FAILED: $*" >&2
  echo "gpu_check: logs in $OUT_DIR" >&2
  exit 1
}
# Seconds of the budget left, at least 1 (timeout 0 would mean no limit).
left() {
  local n=$((BUDGET - (SECONDS - start)))
  echo $((n > 0 ? n : 1))
}
# The time left, at most $1 seconds.
capped() {
  local n
  n=$(left)
  echo $((n < $1 ? n : $1))
}

# --- 1. machine and build --------------------------------------------------
t0=$SECONDS
{
  echo "== $(date -u '+%Y-%m-%d %H:%M:%S UTC') $(uname -srm)"
  nvidia-smi || echo "(nvidia-smi failed)"
  "$PYTHON" - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version())
print("GPU:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none visible")
EOF
  "$CUDA_HOME/bin/nvcc" --version | tail -2
  echo "== build: TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
} > "$OUT_DIR/build.log" 2>&1 || true
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || fail "torch sees no CUDA GPU ($(grep -m1 '^python' "$OUT_DIR/build.log" || echo 'torch did not import'))"
[ -x "$CUDA_HOME/bin/nvcc" ] || fail "no nvcc at $CUDA_HOME/bin/nvcc (set CUDA_HOME)"
"$PYTHON" -c "import pytest" 2>/dev/null || fail "pytest is not installed for $PYTHON"
if ! timeout "$(left)" "$PYTHON" setup.py build_ext --inplace >> "$OUT_DIR/build.log" 2>&1; then
  tail -30 "$OUT_DIR/build.log" >&2
  fail "building the extension (see build.log)"
fi
"$PYTHON" -c "import cae_kernels, sys; sys.exit(0 if cae_kernels.with_cuda else 1)" \
  || fail "cae_kernels was built without its CUDA kernels (see build.log)"
status[build]=ok
seconds[build]=$((SECONDS - t0))
echo "gpu_check: built for sm ${TORCH_CUDA_ARCH_LIST} in ${seconds[build]} s"

# --- 2. tests ----------------------------------------------------------------
t0=$SECONDS
# Every test marked cuda: the op suite on the cuda backend, the CUDA kernels' tiling,
# autocast, the GPU-only tests (the files by name: test_sim.py, which builds the
# emulator as it is collected, is not among them).
tests=()
for f in tests/test_ops.py tests/test_blocks.py tests/test_encoder_block.py tests/test_decoder_block.py tests/test_loss.py \
  tests/test_cuda_kernels.py tests/test_cuda.py \
  tests/test_autocast.py tests/test_fakes.py; do
  [ -f "$f" ] && tests+=("$f")
done
# A crashing test (a segfault) must not hide the others: the journal
# (CAE_TEST_JOURNAL, tests/conftest.py) records each test as it starts and ends, and
# pytest starts again past the test that crashed, at most 4 times. Each crash gets
# its native backtrace from cuda-gdb (or gdb), each failing test (the first 6) a
# compute-sanitizer memcheck and racecheck, all in tests.log.
journal="$OUT_DIR/.journal"
rm -f "$journal"
: > "$OUT_DIR/tests.log"
for attempt in 1 2 3 4 5; do
  set +e
  CAE_TEST_JOURNAL="$journal" timeout "$(left)" "$PYTHON" -m pytest "${tests[@]}" -m cuda -q -p no:cacheprovider \
    -rfE >> "$OUT_DIR/tests.log" 2>&1
  rc=$?
  set -e
  [ $rc = 5 ] && [ $attempt -gt 1 ] && rc=0  # 5: nothing left to run after a crash
  # 124: out of time; above 128 (not from timeout): killed by a signal.
  if [ $rc -le 128 ] || [ $attempt = 5 ]; then break; fi
  crashed=$(grep '^start ' "$journal" | tail -1 | cut -c7-)
  echo "crashed $crashed (exit $rc)" >> "$journal"
  echo "== gpu_check: pytest died (exit $rc) in $crashed; its backtrace, then the tests after it" >> "$OUT_DIR/tests.log"
  debugger=$(command -v cuda-gdb || command -v gdb || true)  # a toolkit without cuda-gdb: the system's gdb
  if [ -n "$debugger" ] && [ "$(left)" -gt 120 ]; then
    # Started through /bin/sh, which keeps a test id's spaces and brackets in one argument
    # (with startup-with-shell off, gdb splits it at its spaces).
    SHELL=/bin/sh timeout 90 "$debugger" -q -batch -ex 'set pagination off' -ex run -ex bt \
      --args "$PYTHON" -m pytest "$crashed" -q -p no:cacheprovider >> "$OUT_DIR/tests.log" 2>&1 || true
  fi
done
seconds[tests]=$((SECONDS - t0))
counts=$(grep -oE '^(passed|failed|skipped|crashed) ' "$journal" 2>/dev/null | sort | uniq -c | awk '{printf "%s%s %s", sep, $1, $2; sep=", "}')
failed=$(grep -cE '^(failed|crashed) ' "$journal" 2>/dev/null || true)
if [ $rc = 124 ]; then
  status[tests]="TIMED OUT ($counts)"
elif [ "${failed:-0}" = 0 ] && [ $rc = 0 ]; then
  status[tests]="ok ($counts)"
else
  status[tests]="FAILED ($counts$([ $rc -le 1 ] || echo "; pytest exit $rc"))"
fi
if [ "${failed:-0}" != 0 ]; then
  {
    echo "== gpu_check: the failures, as the journal kept them"
    awk '/^(failed|crashed) /{keep=1; print; next} /^(start|passed|skipped) /{keep=0} keep' "$journal"
  } >> "$OUT_DIR/tests.log"
  if command -v compute-sanitizer > /dev/null; then
    mapfile -t failing < <(grep '^failed ' "$journal" | cut -c8- | sort -u | head -6)
    for tool in memcheck racecheck; do
      [ ${#failing[@]} -gt 0 ] && [ "$(left)" -gt 150 ] || break
      echo "== gpu_check: compute-sanitizer --tool $tool on ${#failing[@]} failing tests" >> "$OUT_DIR/tests.log"
      timeout 75 compute-sanitizer --tool $tool --print-limit 20 "$PYTHON" -m pytest "${failing[@]}" -q \
        -p no:cacheprovider >> "$OUT_DIR/tests.log" 2>&1 || true
    done
  fi
fi
rm -f "$journal"
tail -5 "$OUT_DIR/tests.log"

# The loss over 1,000 training steps on our kernels (per op and fused) and on
# PyTorch's float32 (both layouts) against PyTorch's float64 (scripts/loss_curve.py),
# then bfloat16 training's eval loss after cae train's 50 epochs against float32's
# (scripts/precision_check.py, within 2%), appended to tests.log. Each runs
# whatever the other gives, in at most 150 s, so that the benchmarks keep their time.
t0=$SECONDS
set +e
{
  echo "== scripts/loss_curve.py --device cuda"
  timeout "$(capped 150)" "$PYTHON" scripts/loss_curve.py --device cuda
  rc_curve=$?
  echo "== scripts/precision_check.py"
  timeout "$(capped 150)" "$PYTHON" scripts/precision_check.py
  rc_precision=$?
} > "$OUT_DIR/.loss_curve" 2>&1
rc=$((rc_curve != 0 ? rc_curve : rc_precision))
set -e
cat "$OUT_DIR/.loss_curve" >> "$OUT_DIR/tests.log"
case $rc in
  0) status[loss]=ok ;;
  124) status[loss]="TIMED OUT" ;;
  *) status[loss]="FAILED (exit $rc)" ;;
esac
seconds[loss]=$((SECONDS - t0))

# --- 3. where the step's GPU time goes -----------------------------------------
# Per kernel (scripts/profile_step.py: torch.profiler over eager steps, graphed step
# beside it), then Nsight Compute's view of one fused step's kernels, in profile.log.
t0=$SECONDS
status[profile]="skipped (time)"
if [ "$(left)" -gt 200 ]; then
  set +e
  timeout 100 "$PYTHON" scripts/profile_step.py > "$OUT_DIR/profile.log" 2>&1
  rc=$?
  set -e
  [ $rc = 0 ] && status[profile]=ok || status[profile]="FAILED (exit $rc)"
  if command -v ncu > /dev/null && [ "$(left)" -gt 200 ]; then
    echo "== ncu: one fused NHWC step" >> "$OUT_DIR/profile.log"
    timeout 120 ncu --profile-from-start off --section SpeedOfLight --section Occupancy --section LaunchStats \
      --section MemoryWorkloadAnalysis --section WarpStateStats "$PYTHON" scripts/profile_step.py --ncu \
      >> "$OUT_DIR/profile.log" 2>&1 || echo "gpu_check: ncu failed (see profile.log)"
  fi
fi
seconds[profile]=$((SECONDS - t0))

# --- 4. benchmarks -----------------------------------------------------------
t0=$SECONDS
if compgen -G "benchmarks/bench_*.py" > /dev/null; then
  budget=$(($(left) - 20))
  if ! "$PYTHON" -c "import pytest_benchmark" 2>/dev/null; then
    status[bench]="skipped (pytest-benchmark not installed)"
  elif [ "$budget" -lt 30 ]; then
    status[bench]="skipped (time)"
  else
    set +e
    # shellcheck disable=SC2086
    # The files by name: collected whatever pytest's python_files says.
    timeout "$budget" "$PYTHON" -m pytest benchmarks/bench_*.py -q -p no:cacheprovider --device cuda \
      --benchmark-json="$OUT_DIR/bench.json" ${BENCH_ARGS:-} > "$OUT_DIR/bench.log" 2>&1
    rc=$?
    set -e
    case $rc in
      0) status[bench]=ok ;;
      124) status[bench]="TIMED OUT after $budget s (set BENCH_ARGS, e.g. --rounds 10)" ;;
      *) status[bench]="FAILED (pytest exit $rc)" ;;
    esac
    if [ -f "$OUT_DIR/bench.json" ] && [ -f benchmarks/report.py ]; then
      "$PYTHON" benchmarks/report.py "$OUT_DIR/bench.json" --out "$OUT_DIR" >> "$OUT_DIR/bench.log" 2>&1 \
        || echo "gpu_check: benchmarks/report.py failed (see bench.log)"
    fi
  fi
else
  status[bench]="none (no benchmarks/bench_*.py)"
fi
seconds[bench]=$((SECONDS - t0))

# --- 5. the table --------------------------------------------------------------
"$PYTHON" - "$OUT_DIR" "${status[build]}" "${seconds[build]}" "${status[tests]}" "${seconds[tests]}" \
  "${status[profile]}" "${seconds[profile]}" "${status[bench]}" "${seconds[bench]}" "$((SECONDS - start))" > "$OUT_DIR/summary.txt" <<'EOF' || true
import json, math, os, sys
from collections import defaultdict

out, b_st, b_s, t_st, t_s, p_st, p_s, x_st, x_s, total = sys.argv[1:]
lines = []
try:
    import torch
    gpu = torch.cuda.get_device_name()
except Exception:
    gpu = "?"
lines.append(f"gpu_check on {gpu}: {total} s")
lines.append(f"{'step':<12}{'status':<40}{'seconds':>8}")
lines.append(f"{'build':<12}{b_st:<40}{b_s:>8}")
lines.append(f"{'tests':<12}{t_st[:60]:<40}{t_s:>8}")
lines.append(f"{'profile':<12}{p_st[:60]:<40}{p_s:>8}")
lines.append(f"{'benchmarks':<12}{x_st[:60]:<40}{x_s:>8}")
try:  # the step's GPU time per path (profile.log has the kernels)
    with open(os.path.join(out, "profile.log")) as f:
        totals = [line.rstrip() for line in f if " us of GPU time a step" in line]
    if totals:
        lines += ["", "GPU time per training step, conv-pool (scripts/profile_step.py):", *totals]
except FileNotFoundError:
    pass
try:
    with open(os.path.join(out, "bench.json")) as f:
        rows = [dict(b.get("extra_info", {}), median=b["stats"]["median"]) for b in json.load(f)["benchmarks"]]
    ops = [r for r in rows if r.get("kind") == "op" and isinstance(r.get("batch"), int)]
    batch = 256 if any(r["batch"] == 256 for r in ops) else max((r["batch"] for r in ops), default=0)
    ops = [r for r in ops if r["batch"] == batch]
    times = defaultdict(dict)
    for r in ops:
        times[(r["case"], r["layout"], r["direction"])][r["impl"]] = r["median"]
    if times:
        lines.append("")
        lines.append(f"{'ops at batch ' + str(batch) + ', float32, median ms':<44} {'cae':>8} {'torch':>8} {'cae/torch':>9}")
        ratios = []
        for (case, layout, direction), t in sorted(times.items()):
            if "cae" in t and "torch" in t:
                ratios.append(t["cae"] / t["torch"])
                short = "fwd+bwd" if "backward" in direction else "fwd"
                lines.append(f"{case[:31]:<31} {layout:<4} {short:<7} {t['cae'] * 1e3:>8.3f} "
                             f"{t['torch'] * 1e3:>8.3f} {t['cae'] / t['torch']:>9.2f}")
        if ratios:
            lines.append(f"geometric mean cae/torch over {len(ratios)} rows: "
                         f"{math.exp(sum(map(math.log, ratios)) / len(ratios)):.2f}")
    # The training step: cae is the fused block ops on CUDA, cae-per-op the per-op path.
    steps = defaultdict(dict)
    for r in rows:
        if r.get("kind") == "train":
            steps[(r["model"], r["layout"], r["batch"])][r["impl"]] = r["median"]
    step_lines = [
        f"train step {model} {layout} batch {batch} (median, / torch eager): "
        + ", ".join(f"{impl} {ms * 1e3:.3f} ms ({ms / t['torch']:.2f})" for impl, ms in sorted(t.items()))
        for (model, layout, batch), t in sorted(steps.items()) if "torch" in t
    ]
    if step_lines:
        lines += ["", *step_lines]
except FileNotFoundError:
    pass
except Exception as e:  # the table must not hide the logs
    lines.append(f"(benchmark table unavailable: {e})")
print("\n".join(lines))
EOF
{
  echo
  echo "loss curve (${status[loss]}, ${seconds[loss]} s):"
  grep -E "^(torch|cae|bound|loss_curve|precision_check)" "$OUT_DIR/.loss_curve" || true
} >> "$OUT_DIR/summary.txt"
rm -f "$OUT_DIR/.loss_curve"
echo
cat "$OUT_DIR/summary.txt"
echo "gpu_check: logs and results in $OUT_DIR"
[[ "${status[tests]}" = ok* ]] || fail "tests: ${status[tests]} (see tests.log)"
[ "${status[loss]}" = ok ] || fail "loss curve: ${status[loss]} (see tests.log)"
case "${status[bench]}" in ok | none* | skipped*) ;; *) fail "benchmarks: ${status[bench]} (see bench.log)" ;; esac
