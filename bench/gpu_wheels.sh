#!/usr/bin/env bash
# Wheels of what the GPU machine's Python (3.12, x86-64) lacks for the GPU suite, into .whl/
# (ignored by git; carried to the machine): datasets and what it needs, TRL, bitsandbytes, and
# DeepSpeed (a source package: built here into a pure-Python wheel; its kernels compile on use).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude || echo /.whl/ >> .git/info/exclude
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux_2_24_x86_64 -d .whl \
  datasets dill multiprocess trl bitsandbytes
python3 -m pip wheel --no-deps --no-build-isolation -w .whl deepspeed hjson ninja py-cpuinfo
