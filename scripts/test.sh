#!/usr/bin/env bash
# Install, then run the whole test suite (unit, integration on a real local Ray, e2e CLI).
set -euo pipefail
cd "$(dirname "$0")/.."
MMKD_EXTRAS=test,lmms bash scripts/install.sh
# the test-only workloads and fixtures: a plugin package, found through mmkd's entry points
python3 -m pip install -q --no-deps -e tests/plugin
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}" TOKENIZERS_PARALLELISM=false
exec python3 -m pytest tests -q -p no:cacheprovider --timeout=900 --durations=25 "$@"
