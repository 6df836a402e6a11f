#!/usr/bin/env bash
# Install mmkd (editable) with its test extras.
# On a machine without an NVIDIA GPU, torch is constrained to the CPU build pip finds
# (constraints/cpu.txt); with a GPU, pip installs torch as usual (CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "$PY" -m pip install -q -e ".[test]"
else
  "$PY" -m pip install -q -c constraints/cpu.txt -e ".[test]"
fi
