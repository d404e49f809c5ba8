#!/usr/bin/env bash
# One run on a lent H200 (or any sm_90 GPU with a CUDA 13 toolkit): builds pyobcache with CMake
# against the prebuilt CUDA ggml, checks the CUDA ops against the CPU (test_obc_ops_cuda, plus
# compute-sanitizer's memcheck and racecheck on the small shapes when it is there), and times them
# (bench_obc_ops_cuda). About 3 minutes.
#
# Needs: nvcc on PATH (its toolkit's targets/x86_64-linux/lib holds libcudart and libcublas), cmake
# (ninja if present), and the prebuilt CUDA ggml as
#   cuda-carry/libggml-0.20.2-cuda13-sm90-novmm.tar.xz   (from ../shared/cuda/, ignored by git)
# or already extracted as cuda-carry/libggml. From the repository root:
#   bash bench/gpu/run_h200.sh
# Results: $OUT/gpu_ops_h200.json (also copied to bench/results/gpu_ops_h200.json) and the logs of
# each step in $OUT (default /tmp/pyobcache-gpu-out). Exits non-zero when the build or a check
# fails; the timings still run after a failed check, so that one call gives every figure.
set -euo pipefail

cd "$(dirname "$0")/../.."
ROOT=$PWD
OUT=${OUT:-/tmp/pyobcache-gpu-out}
BUILD=${BUILD_DIR:-/tmp/pyobcache-gpu-build}
TARBALL=libggml-0.20.2-cuda13-sm90-novmm.tar.xz
SHA256=07087768637ff60467ef852e3fa74e3fc0f948eb75d39c3d6c9b8375eb1d4721
JOBS=$(nproc)
mkdir -p "$OUT"
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"

step() { printf '\n=== %s  [%s]\n' "$*" "$(date -u +%H:%M:%S)"; }
note() { echo "$*" | tee -a "$SUMMARY"; }

step "toolkit and GPU"
NVCC=$(command -v nvcc) || { echo "nvcc is not on PATH"; exit 2; }
# the toolkit's root as nvcc reports it (nvcc may be a symlink or a wrapper script)
CUDA_ROOT=$("$NVCC" -v --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1 || true)
if [ -n "$CUDA_ROOT" ]; then
  CUDA_ROOT=$(cd "$CUDA_ROOT" && pwd -P)
else
  CUDA_ROOT=$(dirname "$(dirname "$(readlink -f "$NVCC")")")
fi
CUDA_LIB=$CUDA_ROOT/targets/x86_64-linux/lib
[ -d "$CUDA_LIB" ] || CUDA_LIB=$CUDA_ROOT/lib64
export LD_LIBRARY_PATH=$CUDA_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
# libggml-cuda needs cuBLAS: the toolkit's, else the nvidia-cublas wheel of the machine's python3
CUBLAS_DIR=""
if ls "$CUDA_LIB"/libcublas.so.13* >/dev/null 2>&1; then
  CUBLAS_DIR=$CUDA_LIB
elif command -v python3 >/dev/null; then
  CUBLAS_DIR=$(python3 - <<'EOF' 2>/dev/null || true
import glob, os
try:
    import nvidia
except ImportError:
    raise SystemExit
for p in nvidia.__path__:
    hits = glob.glob(os.path.join(p, "*", "lib", "libcublas.so.13*"))
    if hits:
        print(os.path.dirname(hits[0]))
        break
EOF
)
  if [ -n "$CUBLAS_DIR" ]; then export LD_LIBRARY_PATH=$CUBLAS_DIR:$LD_LIBRARY_PATH; fi
fi
"$NVCC" --version | tail -1
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || true)
GPU_NAME=${GPU_NAME:-unknown}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
note "gpu: $GPU_NAME"
note "cuda: $CUDA_ROOT (cuBLAS: ${CUBLAS_DIR:-not found})"

step "CUDA ggml"
GGML=$ROOT/cuda-carry/libggml
if [ ! -f "$GGML/lib/cmake/ggml/ggml-config.cmake" ]; then
  TB=""
  for c in "$ROOT/cuda-carry/$TARBALL" "$ROOT/../shared/cuda/$TARBALL"; do
    if [ -f "$c" ]; then TB=$c; break; fi
  done
  if [ -z "$TB" ]; then
    echo "missing $TARBALL: copy ../shared/cuda/$TARBALL to cuda-carry/ (and carry it)"
    exit 2
  fi
  if command -v sha256sum >/dev/null; then
    echo "$SHA256  $TB" | sha256sum -c - || { echo "$TB: wrong sha256"; exit 2; }
  fi
  mkdir -p "$ROOT/cuda-carry"
  tar -xJf "$TB" -C "$ROOT/cuda-carry"
fi
ls "$GGML/lib"

step "build (CMake, $JOBS jobs)"
GEN=Unix\ Makefiles
if command -v ninja >/dev/null; then GEN=Ninja; fi
LINK="-Wl,-rpath-link,$CUDA_LIB"
if [ -n "$CUBLAS_DIR" ]; then
  LINK="$LINK -Wl,-rpath-link,$CUBLAS_DIR"
else
  # the test and the timings still link and run: only ggml's own CUDA matmuls need cuBLAS
  LINK="$LINK -Wl,--allow-shlib-undefined"
fi
rm -rf "$BUILD"
set +e
{
  cmake -S "$ROOT" -B "$BUILD" -G "$GEN" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_PREFIX_PATH="$GGML/lib/cmake" -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_CUDA_COMPILER="$NVCC" \
    -DCMAKE_EXE_LINKER_FLAGS="$LINK" -DCMAKE_SHARED_LINKER_FLAGS="$LINK" &&
  cmake --build "$BUILD" -j "$JOBS"
} 2>&1 | tee "$OUT/build.log"
BUILD_RC=${PIPESTATUS[0]}
set -e
if [ "$BUILD_RC" -ne 0 ] || [ ! -x "$BUILD/test_obc_ops_cuda" ]; then
  note "build: FAILED (see build.log)"
  exit 1
fi
grep -q "pyobcache: CUDA ops" "$OUT/build.log" || { note "build: the CUDA ops were not configured"; exit 1; }
note "build: ok"

FAILED=0
step "correctness: test_obc_ops_cuda (CUDA vs the CPU op, float64, host gather, select_keep)"
set +e
"$BUILD/test_obc_ops_cuda" 2>&1 | tee "$OUT/test_obc_ops_cuda.log"
RC=${PIPESTATUS[0]}
set -e
note "test_obc_ops_cuda: rc=$RC, $(tail -1 "$OUT/test_obc_ops_cuda.log")"
if [ "$RC" -ne 0 ] || grep -q "^SKIP" "$OUT/test_obc_ops_cuda.log"; then FAILED=1; fi

if command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck; do
    step "compute-sanitizer --tool $tool (small shapes)"
    set +e
    timeout 150 compute-sanitizer --tool "$tool" --error-exitcode 99 "$BUILD/test_obc_ops_cuda" --quick \
      >"$OUT/sanitizer_$tool.log" 2>&1
    RC=$?
    set -e
    tail -4 "$OUT/sanitizer_$tool.log"
    case $RC in
      0) note "compute-sanitizer $tool: clean" ;;
      124) note "compute-sanitizer $tool: timed out (not a failure of the ops)" ;;
      *) note "compute-sanitizer $tool: rc=$RC (see sanitizer_$tool.log)"; FAILED=1 ;;
    esac
  done
else
  note "compute-sanitizer: not on PATH, skipped"
fi

# The engine end to end, when a GGUF is at hand (MODEL_GGUF=path; SmolLM2 is 98 MB, so it comes in
# two carried halves or is written by an earlier call): greedy text on the GPU (-ngl 999) against the
# CPU, full cache and obc-vk, then prefill / decode speed on an ~8k-token prompt.
if [ -n "${MODEL_GGUF:-}" ] && [ -f "$MODEL_GGUF" ]; then
  step "engine: $MODEL_GGUF on the GPU against the CPU"
  CLI=$BUILD/cpp/obcache-cli
  for kvargs in "" "--kv-method obc-vk --kv-budget 128"; do
    for ngl in 0 999; do
      # shellcheck disable=SC2086
      "$CLI" -m "$MODEL_GGUF" -p "The capital of France is" -n 32 --temp 0 -ngl $ngl $kvargs \
        >"$OUT/e2e_ngl${ngl}${kvargs:+_obcvk}.txt" 2>"$OUT/e2e_ngl${ngl}${kvargs:+_obcvk}.log" || true
    done
    if cmp -s "$OUT/e2e_ngl0${kvargs:+_obcvk}.txt" "$OUT/e2e_ngl999${kvargs:+_obcvk}.txt"; then
      note "engine greedy ${kvargs:-full cache}: GPU = CPU"
    else
      note "engine greedy ${kvargs:-full cache}: GPU differs from CPU (see e2e_*.txt)"
    fi
  done
  yes "The history of the region is long and varied. Farmers grew wheat and barley in the valleys, while traders carried salt and cloth along the rivers to the coast." |
    head -n 300 >"$OUT/long_prompt.txt"
  for kvargs in "" "--kv-method obc-vk --kv-budget 512"; do
    # shellcheck disable=SC2086
    "$CLI" -m "$MODEL_GGUF" -f "$OUT/long_prompt.txt" -c 9000 -n 128 --temp 0 -ngl 999 $kvargs \
      >/dev/null 2>"$OUT/speed${kvargs:+_obcvk}.log" || true
    note "engine speed ${kvargs:-full cache}: $(grep -E '^(prompt|generation):' "$OUT/speed${kvargs:+_obcvk}.log" | paste -sd ' ' -)"
  done
fi

step "timings: bench_obc_ops_cuda"
DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)
CHECKS=$(grep -E "^(test_obc_ops_cuda|compute-sanitizer)" "$SUMMARY" | paste -sd ';' -)
set +e
"$BUILD/bench_obc_ops_cuda" --out "$OUT/gpu_ops_h200.json" --date "$DATE" --gpu "$GPU_NAME" --checks "$CHECKS" 2>&1 |
  tee "$OUT/bench.log"
RC=${PIPESTATUS[0]}
set -e
if [ "$RC" -eq 0 ] && [ -f "$OUT/gpu_ops_h200.json" ]; then
  mkdir -p "$ROOT/bench/results"
  cp "$OUT/gpu_ops_h200.json" "$ROOT/bench/results/gpu_ops_h200.json"
  note "timings: $OUT/gpu_ops_h200.json (copy it to bench/results/ in the checkout)"
else
  note "timings: FAILED rc=$RC (see bench.log)"
  FAILED=1
fi

step "summary"
cat "$SUMMARY"
exit "$FAILED"
