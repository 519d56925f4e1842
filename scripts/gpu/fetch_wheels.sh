#!/usr/bin/env bash
# Fetch the Python packages that the GPU machine's image lacks (trl, datasets and their two missing needs, Liger) as
# wheels for its Python 3.12, into .whl/ (ignored by git; carried to the device by `run(carry=[".whl"])`).
# The image already holds torch, triton, transformers, accelerate, peft, pandas, pyarrow, ... (KINDS.md).
# Liger's Hopper CuTe kernel also needs nvidia-cutlass-dsl-libs-cu13, a 92 MB wheel: over the 64 MiB a call may
# carry, so it is not fetched (the bench then reports liger_scaled as skipped and runs Liger's fallback).
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo /.whl/ >> .git/info/exclude; }
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl trl==1.16.0 datasets==5.2.0 dill==0.4.0 multiprocess==0.70.18 liger-kernel==0.8.5
ls -la .whl
du -sh .whl
