#!/usr/bin/env bash
# One command for a GPU session: `pytest -m gpu` with the kernels compiled, the GPU benchmarks,
# and summary.md / summary.json with the acceptance figures (see scripts/gpu_check.py).
#
#   bash scripts/gpu_check.sh [OUT_DIR]            # on a CUDA GPU, at most about five minutes
#   bash scripts/gpu_check.sh --smoke [OUT_DIR]    # tiny sizes on the CPU: checks the scripts
#
# OUT_DIR defaults to $OUT, else ./gpu_check_out. Runs from the checkout, lowbit not installed;
# PYTHON names the interpreter (default python3).
exec "${PYTHON:-python3}" "$(dirname "$0")/gpu_check.py" "$@"
