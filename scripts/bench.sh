#!/usr/bin/env bash
# The throughput benchmark, side by side with transformers (see scripts/bench.py for what it measures).
#   scripts/bench.sh                 # default build and the MKL build
#   MKL=0 scripts/bench.sh           # default build only
#   scripts/bench.sh --skip-rss      # extra arguments go to bench.py
# BENCH_PYTHON may name a Python that already has fixtures/requirements.txt installed.
set -euo pipefail
cd "$(dirname "$0")/.."

py=${BENCH_PYTHON:-}
if [ -z "$py" ]; then
  venv=target/bench-venv
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q -r fixtures/requirements.txt
  fi
  py=$venv/bin/python
fi

args=()
if [ "${MKL:-1}" = 1 ]; then
  bash scripts/build-mkl.sh
  args+=(--armorm "mkl=target/release/armorm-mkl")
fi
cargo build --release
args+=(--armorm "default=target/release/armorm")
exec "$py" scripts/bench.py "${args[@]}" --threads "${THREADS:-$(nproc)}" "$@"
