#!/usr/bin/env bash
# Reproduces the committed evaluation results (eval/results/). Each sweep resumes from the cells
# already in its folder (delete a folder to run it afresh); wall times are in each run.json.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
$py -m pyobcache eval --preset smollm2-fidelity --out eval/results/smollm2_fidelity --no-progress
$py -m pyobcache eval --preset modes --out eval/results/smollm2_modes --no-progress
# Qwen2.5-Coder-1.5B, RULER at 4k, the paper's setting (16 recent tokens, eviction after prefill).
# Samples go round-robin over the tasks, so a sweep stopped early has as many of each.
$py -m pyobcache eval --preset qwen-ruler --samples ${QWEN_SAMPLES:-10} --out eval/results/qwen25coder_ruler_4k --no-progress
# The 2% and 20% budgets on the first 2 samples of each task (the same prompts as samples 0-1 above).
$py -m pyobcache eval --preset qwen-ruler --samples 2 --budgets 2% 20% --out eval/results/qwen25coder_ruler_4k_2pct_20pct --no-progress
