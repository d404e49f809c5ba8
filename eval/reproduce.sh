#!/usr/bin/env bash
# Reproduces the committed evaluation results (eval/results/), in the order they were run.
# Each sweep resumes from the cells already in its folder; delete a folder to run it afresh.
# Wall times on the 2-core machine they were made on: see each folder's run.json.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
# Qwen2.5-Coder-1.5B, RULER at 4k, the paper's setting; a first pass of 5 samples per task, then up to 10.
$py -m pyobcache eval --preset qwen-ruler --samples 5 --out eval/results/qwen25coder_ruler_4k --no-progress
$py -m pyobcache eval --preset smollm2-fidelity --out eval/results/smollm2_fidelity --no-progress
$py -m pyobcache eval --preset modes --out eval/results/smollm2_modes --no-progress
$py -m pyobcache eval --preset qwen-ruler --samples 10 --out eval/results/qwen25coder_ruler_4k --no-progress
