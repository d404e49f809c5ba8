#!/usr/bin/env bash
# Runs the C++ drivers, the CLI and the C example of a sanitizer build (README, "Sanitizers"), with
# eviction in all three modes. Any ASan/UBSan finding aborts its program, so the script stops with
# a non-zero status at the first one.
#   M=model.gguf bash tests/fuzz/run_sanitizers.sh BUILD_DIR
set -euo pipefail
B=${1:-build-asan}
: "${M:?set M to a GGUF file, e.g. M=\$(python -m pyobcache fetch smollm2-135m --print-path)}"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:strict_string_checks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
PROMPT=$(python3 -c 'print("The history of the region is long and varied, with many rulers. " * 24 + "The capital of France is")')

run() {
    echo "+ $*" | cut -c1-200
    "$@" > /tmp/obc_san_out.txt 2> /tmp/obc_san_err.txt || { cat /tmp/obc_san_err.txt; echo "FAILED rc=$?"; exit 1; }
    grep -E "^(prompt|generation|kv cache|generated|test_c_api)" /tmp/obc_san_err.txt /tmp/obc_san_out.txt | sed 's/^[^:]*://' || true
    if grep -qE "runtime error|AddressSanitizer|LeakSanitizer" /tmp/obc_san_err.txt; then cat /tmp/obc_san_err.txt; exit 1; fi
}

run "$B/cpp/test_c_api" "$M"
run "$B/cpp/test_vocab" "$M" --selftest
for mode in prefill chunked decode; do
    for method in obc-vk obc-vk+snapkv streamingllm; do
        run "$B/cpp/obcache-cli" -m "$M" -p "$PROMPT" -n 8 --temp 0 -t 2 --kv-method "$method" --kv-budget 64 --kv-evict "$mode"
    done
    run "$B/cpp/obcache-cli" -m "$M" -p "$PROMPT" -n 8 --temp 0.8 --seed 1 -t 2 -fa on --kv-method obc-v+tova --kv-budget 48 --kv-evict "$mode"
    run "$B/examples/simple" "$M" "$PROMPT" "obc-vk+snapkv,budget=64,evict=$mode"
done
run "$B/cpp/obcache-cli" -m "$M" -p "The capital of France is" -n 16 --temp 0 -t 2
echo "sanitizers: no findings"
