#!/usr/bin/env bash
# Every benchmark, one after the other (never two at once: they share 2 cores).
#   bash benchmarks/run_all.sh        # ~20 minutes on 2 cores; raw numbers in benchmarks/results/
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
if [ ! -x .bench-venv/bin/python ]; then
    # the peer lives in its own venv so it never changes the project's environment (BENCHMARKS.md)
    python3 -m venv .bench-venv
    .bench-venv/bin/python -m pip install -q torch==2.13.0
    .bench-venv/bin/python -m pip install -q trl==1.16.0 transformers==5.24.0
fi
if [ ! -x .bench-venv-trl112/bin/python ]; then
    # TRL removed its PPOTrainer in 1.13.0: the PPO peer is the last release that ships it
    python3 -m venv .bench-venv-trl112
    .bench-venv-trl112/bin/python -m pip install -q torch==2.13.0
    .bench-venv-trl112/bin/python -m pip install -q trl==1.12.0 transformers==5.24.0
fi
$PY benchmarks/prepare_model.py
$PY benchmarks/sft_throughput.py
$PY benchmarks/sample_throughput.py
$PY benchmarks/kernels_cpu.py
$PY benchmarks/ppo_step.py
