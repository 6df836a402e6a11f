#!/usr/bin/env bash
# Install mmkd (editable) with its extras (MMKD_EXTRAS, default "test"; scripts/test.sh adds
# "lmms", the lmms-eval backend of `evaluate`).
# On a machine without an NVIDIA GPU, torch is constrained to the CPU build pip finds
# (constraints/cpu.txt); with a GPU, pip installs torch as usual (CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
EXTRAS="${MMKD_EXTRAS:-test}"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "$PY" -m pip install -q -e ".[$EXTRAS]"
else
  "$PY" -m pip install -q -c constraints/cpu.txt -e ".[$EXTRAS]"
fi
if [[ ",$EXTRAS," == *",lmms,"* ]]; then
  # lmms-eval's declared dependencies pull a CUDA torch and a CUDA torchvision (which breaks
  # CPU torch); what it imports is the `lmms` extra above, so it is installed without them.
  "$PY" -m pip install -q --no-deps lmms-eval==0.7.3
fi
