#!/usr/bin/env bash
# The CPU head benchmark of record (issue 3): forward, backward and forward+backward of the
# fused `cpu` backend beside the eager reference and torch.compile of it, B = 16, 3x224x224,
# float32, with peak memory, appended to benchmarks/RESULTS.md with date, machine and commit.
#   bash benchmarks/cpu_check.sh ["a note on the machine's state"]
# Needs the package installed (README "Install"). Takes about 2 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
note="${1:-}"
exec sib-bench --device cpu --batch 16 --size 224 --dtype float32 --backends reference,compile,cpu \
  --markdown benchmarks/RESULTS.md ${note:+--note "$note"}
