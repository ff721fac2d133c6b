#!/usr/bin/env bash
# The test command (README): install ckpt with its test extras and run every test scenario.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e ".[test]"
python3 -m pytest -q tests "$@"
