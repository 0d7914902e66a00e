#!/usr/bin/env bash
# The ONE script a session runs on a lent GPU machine (bench/RESULTS.md):
#   environment -> CUDA tests (dmd / backend / aot) -> bench/gpu_check.py (copy BW, correctness at real
#   sizes, no-host-sync, timings) -> the compact table LAST. Logs and results go to $OUT (default
#   /tmp/out): gpu_check.json, kernel_time.json, grpo_check.json, fake_score_check.json, and every log
#   and table packed in gpu_check_logs.tgz (the device tool brings back at most 8 files).
# A failing part never stops the rest. Meant to finish in ~5 minutes on an H100.
#
#   device run:  bash bench/gpu_check.sh                       (the repo root is the working directory)
#   dry run:     OUT=/tmp/gpucheck_dry PYTHON=/work/venv/bin/python bash bench/gpu_check.sh
# Knobs (environment): PYTHON, GPU_CHECK_PYTEST_K (the -k expression), GPU_CHECK_PYTEST_EXTRA (extra
# pytest args, word-split), GPU_CHECK_SKIP_PYTEST=1, GPU_CHECK_PYTEST_TIMEOUT (s, default 150),
# GPU_CHECK_TIMEOUT (s, default 300), GPU_CHECK_REPORT=0 (skip `python -m bench.report`, the benchmark suite +
# report.md; GPU_CHECK_REPORT_TIMEOUT, default 240 s), GPU_CHECK_FAKE_TIMEOUT (s, default 150: gpu_fake_score_check.py),
# GPU_CHECK_COMPILE_BUDGET / GPU_CHECK_DEADLINE (seconds, read by gpu_check.py). Extra arguments are
# passed to gpu_check.py (e.g. --dry-run, --no-compile, --cases flux2-1024-b24).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
OUT="${OUT:-/tmp/out}"
export OUT
mkdir -p "$OUT"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# Never run the GPU check under Triton's interpreter (tests/conftest.py sets it itself when there is no CUDA).
unset TRITON_INTERPRET
PY="${PYTHON:-$(command -v python3 || command -v python)}"
T_START=$(date +%s)

echo "== environment" | tee "$OUT/env.txt"
{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  echo "host: $(hostname 2>/dev/null || echo '?')  python: $PY"
  echo "commit: $(git rev-parse --verify -q HEAD 2>/dev/null || echo 'n/a (no git metadata)')"
  nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not available"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader 2>/dev/null || true
  "$PY" - <<'EOF' 2>&1
import sys, torch
print(f"python {sys.version.split()[0]}  torch {torch.__version__} (cuda {torch.version.cuda})  cuda available: {torch.cuda.is_available()}")
for name in ("triton", "pytest", "pytest_benchmark"):
    try:
        mod = __import__(name)
        print(f"{name} {getattr(mod, '__version__', '?')}")
    except Exception as exc:
        print(f"{name}: not importable ({type(exc).__name__}: {exc})")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"gpu {p.name}  sm_{p.major}{p.minor}  {p.multi_processor_count} SMs  {p.total_memory / 2**30:.1f} GiB")
EOF
} 2>&1 | tee -a "$OUT/env.txt"

if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  HAVE_CUDA=1
else
  HAVE_CUDA=0
  echo "!! no CUDA: this is a DRY RUN (tests on CPU, gpu_check.py on tiny CPU shapes)"
fi

PYTEST_RC=skipped
if [ "${GPU_CHECK_SKIP_PYTEST:-0}" != "1" ]; then
  K="${GPU_CHECK_PYTEST_K:-(dmd or backend or aot or policy or advantage or fake_score or edge_rules or saved_grad or anatomy) and not inductor}"
  echo
  echo "== pytest tests/ -q -x -k \"$K\" ${GPU_CHECK_PYTEST_EXTRA:-}  (cuda=$HAVE_CUDA, t=$(( $(date +%s) - T_START ))s)"
  # shellcheck disable=SC2086
  timeout -k 10 "${GPU_CHECK_PYTEST_TIMEOUT:-150}" "$PY" -m pytest tests/ -q -x -k "$K" -p no:cacheprovider \
    ${GPU_CHECK_PYTEST_EXTRA:-} 2>&1 | tee "$OUT/pytest.log"
  PYTEST_RC=${PIPESTATUS[0]}
  [ "$PYTEST_RC" = "124" ] && echo "!! pytest stopped by its timeout (${GPU_CHECK_PYTEST_TIMEOUT:-150}s)"
  [ "$PYTEST_RC" = "5" ] && echo "!! pytest collected no tests for -k \"$K\""
fi

echo
echo "== bench/gpu_check.py $* (t=$(( $(date +%s) - T_START ))s)"
timeout -k 10 "${GPU_CHECK_TIMEOUT:-300}" "$PY" bench/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
CHECK_RC=${PIPESTATUS[0]}
[ "$CHECK_RC" = "124" ] && echo "!! gpu_check.py stopped by its timeout (${GPU_CHECK_TIMEOUT:-300}s); partial JSON in $OUT"

echo
echo "== bench/gpu_kernel_time.py (device time vs host time; t=$(( $(date +%s) - T_START ))s)"
COPY_GBPS=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['copy']['GBps_read_plus_write'])" \
  "$OUT/gpu_check.json" 2>/dev/null || echo 0)
timeout -k 10 "${GPU_CHECK_KERNEL_TIME_TIMEOUT:-180}" "$PY" bench/gpu_kernel_time.py --out "$OUT" \
  --copy-gbps "${COPY_GBPS:-0}" > "$OUT/kernel_time.log" 2>&1
KTIME_RC=$?

echo
echo "== bench/gpu_grpo_check.py (GRPO ops; t=$(( $(date +%s) - T_START ))s)"
timeout -k 10 "${GPU_CHECK_GRPO_TIMEOUT:-180}" "$PY" bench/gpu_grpo_check.py --out "$OUT" \
  --copy-gbps "${COPY_GBPS:-0}" > "$OUT/grpo_check.log" 2>&1
GRPO_RC=$?

echo
echo "== bench/gpu_fake_score_check.py (fake-score ops; t=$(( $(date +%s) - T_START ))s)"
timeout -k 10 "${GPU_CHECK_FAKE_TIMEOUT:-150}" "$PY" bench/gpu_fake_score_check.py --out "$OUT" \
  --copy-gbps "${COPY_GBPS:-0}" > "$OUT/fake_score_check.log" 2>&1
FAKE_RC=$?
[ "$FAKE_RC" = "124" ] && echo "!! gpu_fake_score_check.py stopped by its timeout (${GPU_CHECK_FAKE_TIMEOUT:-150}s)"

# Rollout memory vs K with the SD3.5-M transformer (random weights, bf16, 512 px, B=2); CUDA only
# (the CPU curves come from `python bench/rollout_memory.py` on a CPU machine). GPU_CHECK_ROLLOUT=0 skips it.
ROLLOUT_RC=skipped
if [ "$HAVE_CUDA" = "1" ] && [ "${GPU_CHECK_ROLLOUT:-1}" = "1" ]; then
  echo
  echo "== bench/rollout_memory.py (SD3.5-M, CUDA; t=$(( $(date +%s) - T_START ))s)"
  timeout -k 10 "${GPU_CHECK_ROLLOUT_TIMEOUT:-240}" "$PY" bench/rollout_memory.py --device cuda \
    --config bench/configs/sd35_medium_transformer.json --out "$OUT" --png "$OUT/rollout_memory.png" \
    > "$OUT/rollout_memory.log" 2>&1
  ROLLOUT_RC=$?
fi

# The performance report: the whole benchmark suite (every op fwd and fwd+bwd vs reference eager and
# torch.compile(reference), memory, rollout, training step) + the machine's copy bandwidth, one table and
# report.md for bench/RESULTS.md. GPU_CHECK_REPORT=0 skips it.
REPORT_RC=skipped
if [ "${GPU_CHECK_REPORT:-1}" = "1" ]; then
  echo
  echo "== python -m bench.report (t=$(( $(date +%s) - T_START ))s)"
  timeout -k 10 "${GPU_CHECK_REPORT_TIMEOUT:-240}" "$PY" -m bench.report --max-time 0.1 --min-rounds 3 \
    --save-json "$OUT/bench.json" --markdown "$OUT/report.md" > "$OUT/report.log" 2>&1
  REPORT_RC=$?
  [ "$REPORT_RC" = "124" ] && echo "!! bench.report stopped by its timeout (${GPU_CHECK_REPORT_TIMEOUT:-240}s)"
fi

echo
echo "== done in $(( $(date +%s) - T_START ))s: pytest rc=$PYTEST_RC  gpu_check rc=$CHECK_RC  kernel_time rc=$KTIME_RC  grpo rc=$GRPO_RC  fake_score rc=$FAKE_RC  rollout rc=$ROLLOUT_RC  report rc=$REPORT_RC  (cuda=$HAVE_CUDA; files in $OUT)"
[ -s "$OUT/report.md" ] && { echo; cat "$OUT/report.md"; }
[ -s "$OUT/kernel_time.md" ] && { echo; cat "$OUT/kernel_time.md"; }
[ -s "$OUT/rollout_memory.log" ] && { echo; sed -n '/^| K/,/^$/p' "$OUT/rollout_memory.log"; }
[ -s "$OUT/grpo_check.log" ] && { echo; sed -n '/^\*\*/,$p' "$OUT/grpo_check.log"; }
[ -s "$OUT/fake_score_check.log" ] && { echo; sed -n '/^\*\*/,$p' "$OUT/fake_score_check.log"; }
if [ -s "$OUT/gpu_check_table.md" ]; then
  echo
  cat "$OUT/gpu_check_table.md"
else
  echo "(no table: gpu_check.py did not get to its report; see $OUT/gpu_check.log and gpu_check.json)"
fi
# Pack logs and tables into one archive so that everything fits the device tool's 8-file limit.
(cd "$OUT" && tar czf gpu_check_logs.tgz --remove-files ./*.txt ./*.log ./*.md 2>/dev/null) || true
[ "$PYTEST_RC" = "0" ] && [ "$CHECK_RC" = "0" ] && [ "$GRPO_RC" = "0" ] && [ "$FAKE_RC" = "0" ]
