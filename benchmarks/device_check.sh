#!/usr/bin/env bash
# The prepared single-H100 check (see benchmarks/device_check.py): phi-4-mini packed 8K train-step MFU,
# cuDNN attention vs the reference on packed rows, decode tokens/s. At most 8 minutes.
#
#   bash benchmarks/device_check.sh [extra device_check.py flags]
#
# Writes device_check.json, .log and _nvidia_smi.csv to $OUT (or ./device_check_out); a later run into the same
# folder writes device_check_2.* (then _3, ...), so it never erases an earlier run's figures. Exits non-zero when a
# part failed or JAX has no GPU. Uses .venv when present; the GPU needs a CUDA build of jaxlib
# (jax[cuda13] on the CUDA 13 device image) in that environment.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # phi_jax from this checkout, installed or not
out_dir="${OUT:-./device_check_out}"
mkdir -p "$out_dir"
name="device_check"
run=1
while [ -e "$out_dir/$name.json" ] || [ -e "$out_dir/$name.log" ]; do
  run=$((run + 1))
  name="device_check_$run"
done
python="python3"
[ -x .venv/bin/python ] && python=".venv/bin/python"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out_dir/${name}_nvidia_smi.csv" 2>&1 || true
XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}" \
  timeout 470 "$python" benchmarks/device_check.py --out "$out_dir/$name.json" "$@" 2>&1 \
  | tee "$out_dir/$name.log"
exit "${PIPESTATUS[0]}"
