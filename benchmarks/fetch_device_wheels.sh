#!/usr/bin/env bash
# Downloads, here, the wheels the GPU machine's fixed Python 3.12 image lacks, into .whl/
# (git-ignored), for `benchmarks/RESULTS.md` "GPU acceptance on a lent machine" to carry.
#
#   benchmarks/fetch_device_wheels.sh                 # the default list below
#   benchmarks/fetch_device_wheels.sh NAME==VERSION   # other or further pins
#   PY_VERSION=3.11 DEST=/tmp/whl benchmarks/fetch_device_wheels.sh   # for a dry run here
#
# That image (/work/.library/device/KINDS.md, read 2026-11) has torch 2.11, torchvision
# 0.26, timm, tensorboard, matplotlib, safetensors, transformers, numpy, pillow and
# pytest, so of the packages our code imports (requirements.txt) it lacks only
# simplejpeg; util/jpeg.py also runs without it (PIL fallback, one warning line), but the
# acceptance's input-pipeline numbers are then PIL's. simplejpeg needs numpy only (there).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
pins=("$@")
[ ${#pins[@]} -gt 0 ] || pins=("$(grep -E '^simplejpeg==' requirements.txt)")
dest=${DEST:-.whl}
mkdir -p "$dest"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "${PY_VERSION:-3.12}" --implementation cp \
  "${platforms[@]}" -d "$dest" "${pins[@]}"
ls -l "$dest"
du -sh "$dest"
