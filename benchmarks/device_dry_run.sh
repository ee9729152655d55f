#!/usr/bin/env bash
# A dry run, on this CPU machine, of the two device commands in benchmarks/RESULTS.md ("GPU
# acceptance on a lent machine"): benchmarks/device_plan.sh 1 and 2 in their --quick form,
# each twice: with wheels (simplejpeg built for this Python, fetched into a folder used as
# .whl/, installed into a target folder on PYTHONPATH and imported from there) and without
# (an empty wheel folder, simplejpeg hidden by a sitecustomize as on the GPU image: the PIL
# fallback). Each prints its planned and measured time; reports under OUT_DIR/{with,without}.
#
#   benchmarks/device_dry_run.sh [OUT_DIR]          # PYTHON=... for another interpreter
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-$(mktemp -d)}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$OUT" "$work/hide" "$work/empty"
pyver=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
echo "dry run with $PY (Python $pyver)"
PY_VERSION=$pyver DEST="$work/whl" PYTHON=$PY benchmarks/fetch_device_wheels.sh || echo "wheel fetch failed: the 'with' runs have none"
echo "import sys; sys.modules['simplejpeg'] = None" > "$work/hide/sitecustomize.py"
failed=0
for plan in 1 2; do
    SITE=$work/site$plan WHL=$work/whl OUT=$OUT/with PYTHON=$PY LIMIT=900 \
        bash benchmarks/device_plan.sh "$plan" --quick || failed=1
    PYTHONPATH=$work/site$plan "$PY" -c "import simplejpeg, sys; assert simplejpeg.__file__.startswith(sys.argv[1]); \
print('with wheels: simplejpeg from', simplejpeg.__file__)" "$work/site$plan" || failed=1
    PYTHONPATH=$work/hide SITE=$work/nosite$plan WHL=$work/empty OUT=$OUT/without PYTHON=$PY LIMIT=900 \
        bash benchmarks/device_plan.sh "$plan" --quick || failed=1
    grep -q "no simplejpeg (PIL fallback)" "$OUT/without/plan$plan.md" || failed=1
    grep -q "simplejpeg [0-9]" "$OUT/with/plan$plan.md" || failed=1
    # a section skipped for want of budget did not run: the dry run did not show it works
    ! grep -h "skipped\*\*" "$OUT/with/plan$plan.md" "$OUT/without/plan$plan.md" || failed=1
done
grep -h "^device command" "$OUT"/with/plan*.log "$OUT"/without/plan*.log
[ "$failed" = 0 ] && echo "dry run passed; reports in $OUT" || { echo "dry run FAILED; reports in $OUT"; exit 1; }
