#!/usr/bin/env bash
# Device command N (1 or 2) of benchmarks/RESULTS.md ("GPU acceptance on a lent machine"):
# the carried wheels installed if there are any, then gpu_acceptance.py --plan N, its report
# in $OUT/planN.md section by section and its output in $OUT/planN.log.
#
#   bash benchmarks/device_plan.sh 1        # device tool: carry [".whl"], timeout_s 250
#   bash benchmarks/device_plan.sh 2        # device tool: carry [".whl"], timeout_s 310
#
# Nothing here may stop the acceptance (no `set -e`, no `&&` chain): no .whl/, an empty one
# or a failed install is one line, and the acceptance runs without simplejpeg (util/jpeg.py
# decodes with PIL and says so). The whole command is held to LIMIT seconds (240 / 300).
# Environment: OUT (default: a new temporary folder), PYTHON (python3), WHL (.whl), SITE
# (where the wheels go, /tmp/site), LIMIT; further arguments go to gpu_acceptance.py.
plan=${1:?usage: device_plan.sh 1|2 [gpu_acceptance.py arguments]}
shift
cd "$(dirname "$0")/.." || exit 2
case $plan in 1) default_limit=240 ;; 2) default_limit=300 ;; *) echo "error: plan is 1 or 2, not $plan" >&2; exit 2 ;; esac
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d)}
WHL=${WHL:-.whl}
SITE=${SITE:-/tmp/site}
LIMIT=${LIMIT:-$default_limit}
mkdir -p "$OUT"
log=$OUT/plan$plan.log
start=$(date +%s)
{
    wheels=("$WHL"/*.whl)
    if [ -e "${wheels[0]}" ]; then
        if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
                "${wheels[@]}"; then
            echo "wheels: ${#wheels[@]} installed into $SITE from $WHL/"
        else
            echo "wheels: pip install from $WHL/ failed (exit $?); going on without them"
        fi
    else
        echo "wheels: none in $WHL/; going on without them"
    fi
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
    left=$((LIMIT - ($(date +%s) - start) - 5))
    timeout --kill-after=5 "$left" "$PY" benchmarks/gpu_acceptance.py --plan "$plan" --results_md "$OUT/plan$plan.md" "$@"
    echo "acceptance exit status $?"
} 2>&1 | tee "$log"
rc=$(grep -o 'acceptance exit status [0-9]*' "$log" | tail -1 | grep -o '[0-9]*$')
echo "device command $plan: planned at most $LIMIT s, measured $(($(date +%s) - start)) s; report in $OUT/plan$plan.md" | tee -a "$log"
exit "${rc:-1}"
