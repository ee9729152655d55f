#!/usr/bin/env bash
# A dry run, on this CPU machine, of the device command in benchmarks/RESULTS.md ("GPU
# acceptance on a lent machine"): the carried wheels (built for this Python here) installed
# into a target folder put on PYTHONPATH, simplejpeg then hidden (a sitecustomize that makes
# `import simplejpeg` fail, as on the GPU image without the wheels) to prove the PIL
# fallback, and the acceptance in its --quick form, its report under $OUT.
#
#   benchmarks/device_dry_run.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-$(mktemp -d)}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$OUT" "$work/hide"
pyver=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
PY_VERSION=$pyver DEST="$work/whl" PYTHON=$PY benchmarks/fetch_device_wheels.sh
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$work/site" "$work"/whl/*.whl
PYTHONPATH=$work/site "$PY" -c "import simplejpeg; print('simplejpeg installed at', simplejpeg.__file__)"
echo "import sys; sys.modules['simplejpeg'] = None" > "$work/hide/sitecustomize.py"
export PYTHONPATH=$work/hide:$work/site PYTHONUNBUFFERED=1
"$PY" -c "import util.jpeg as j; assert j.simplejpeg is None; print('simplejpeg hidden: util/jpeg.py falls back to PIL')"
"$PY" benchmarks/gpu_acceptance.py --quick --results_md "$OUT/gpu_acceptance.md" 2>&1 | tee "$OUT/gpu_acceptance.log"
echo "dry run passed; report in $OUT/gpu_acceptance.md"
