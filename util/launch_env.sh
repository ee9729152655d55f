# Sourced by pretrain.sh, linprobe.sh and finetune.sh: the torchrun topology from
# the environment (NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, GPUS_PER_NODE;
# under srun on several nodes: SLURM_NNODES, SLURM_NODEID, and MASTER_ADDR = the
# step's first host; inside an srun step SLURM's node count and node id win over inherited
# ones, and under SLURM the port is unique per job and step) and the interpreter (PYTHON,
# default the project's .venv). Defines WORLD, the TORCHRUN command array, and
# plan_batch / launch for the launchers.
IN_STEP=0  # started by srun inside an allocation: SLURM's topology wins over inherited variables
[ -n "${SLURM_JOB_ID:-}" ] && [[ ${SLURM_STEP_ID:-} =~ ^[0-9]+$ ]] && IN_STEP=1
if [ "$IN_STEP" -eq 1 ]; then
  # sbatch exports the submitting shell's variables: an exported NODE_RANK=0 made every node node 0
  from_slurm() {  # NAME VALUE: set NAME to SLURM's VALUE, saying so when the environment had another
    if [ -n "${!1:-}" ] && [ "${!1}" != "$2" ]; then
      echo "note: $1=${!1} from the environment ignored: srun says $1=$2" >&2
    fi
    printf -v "$1" '%s' "$2"
  }
  from_slurm NNODES "${SLURM_STEP_NUM_NODES:-${SLURM_NNODES:-1}}"
  from_slurm NODE_RANK "${SLURM_NODEID:-0}"
  if [ "${SLURM_STEP_NUM_TASKS:-$NNODES}" -ne "$NNODES" ]; then  # torchrun starts the node's processes
    echo "error: srun started $SLURM_STEP_NUM_TASKS tasks on $NNODES nodes: run $(basename "$0") once per node" \
         "(srun --ntasks-per-node=1)" >&2
    exit 2
  fi
  if [ "$NNODES" -gt 1 ]; then  # torchrun's rank 0 runs on the step's first host
    FIRST_HOST=$(scontrol show hostnames "${SLURM_STEP_NODELIST:-$SLURM_JOB_NODELIST}" 2>/dev/null | head -n 1 || true)
    if [ -z "${MASTER_ADDR:-}" ]; then
      MASTER_ADDR=$FIRST_HOST
    elif [ -n "$FIRST_HOST" ] && [ "$MASTER_ADDR" != "$FIRST_HOST" ]; then
      # kept (it may name the first host's fast interface), but an inherited stale one hangs the rendezvous
      echo "note: MASTER_ADDR=$MASTER_ADDR from the environment kept: node 0 of this step is $FIRST_HOST" >&2
    fi
  fi
  JOB_PORT=$((15000 + (SLURM_JOB_ID + 1000 * SLURM_STEP_ID) % 10000))  # step 0: as submit_slurm.py
  if [ -n "${MASTER_PORT:-}" ] && [ "$MASTER_PORT" != "$JOB_PORT" ]; then
    echo "note: MASTER_PORT=$MASTER_PORT from the environment kept: unset it for this job's own" \
         "port $JOB_PORT (jobs sharing a node and a port collide)" >&2
  fi
elif [ -n "${SLURM_JOB_ID:-}" ] && [ -z "${NNODES:-}" ] && [ "${SLURM_NNODES:-1}" -gt 1 ]; then
  echo "error: ${SLURM_NNODES} nodes: start $(basename "$0") once per node with" \
       "srun --ntasks-per-node=1 bash $(basename "$0") ..." >&2  # the batch script runs on the first node only
  exit 2
elif [ -n "${SLURM_JOB_ID:-}" ] && [ "${SLURM_NNODES:-1}" -gt "${NNODES:-1}" ]; then  # an inherited NNODES=1
  echo "note: NNODES=$NNODES in an allocation of $SLURM_NNODES nodes: this runs on this node only" \
       "(srun --ntasks-per-node=1 bash $(basename "$0") ... uses them all)" >&2
fi
if [ -n "${SLURM_JOB_ID:-}" ] && [ -z "${MASTER_PORT:-}" ]; then
  # unique per job and step on a node too: two single-node jobs (or steps) on one node shared 29500
  MASTER_PORT=$((15000 + (SLURM_JOB_ID + 1000 * ${SLURM_STEP_ID:-0}) % 10000))  # step 0: as submit_slurm.py
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
if [ "$NNODES" -gt 1 ]; then  # node 1.. would wait on their own loopback
  case "${MASTER_ADDR:-}" in
    ""|127.*|localhost|::1|0.0.0.0)
      echo "error: NNODES=$NNODES needs MASTER_ADDR = node 0's name or address, the same on every node" \
           "(got '${MASTER_ADDR:-}')" >&2
      exit 2 ;;
  esac
fi
if [ "$NNODES" -eq 1 ] && [ -n "${MASTER_ADDR:-}" ]; then  # one node meets on itself
  case "$MASTER_ADDR" in
    127.*|localhost|::1) ;;
    *) echo "note: MASTER_ADDR=$MASTER_ADDR from the environment ignored: one node meets on 127.0.0.1" >&2
       MASTER_ADDR=127.0.0.1 ;;
  esac
fi
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
PYTHON=${PYTHON:-python}
[ -x .venv/bin/python ] && [ "$PYTHON" = python ] && PYTHON=.venv/bin/python
if [ -z "${GPUS_PER_NODE:-}" ]; then
  GPUS_PER_NODE=$("$PYTHON" -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi
WORLD=$((NNODES * GPUS_PER_NODE))
TORCHRUN=("$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK"
          --nproc_per_node "$GPUS_PER_NODE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")

# plan_batch EFF DEFAULT_BATCH [ARGS...]: BATCH per GPU and ACCUM so that BATCH x WORLD x ACCUM
# is exactly the recipe's effective batch EFF (EFF_BATCH overrides it) at this world size.
# BATCH and ACCUM from the environment, or --batch_size / --accum_iter among the launcher's
# extra ARGS (which reach the script last and win), are kept (and checked); else BATCH is the
# recipe's, lowered when WORLD x BATCH would exceed EFF, and ACCUM makes up the rest.
plan_batch() {
  EFF=${EFF_BATCH:-$1}
  local default=$2
  shift 2
  batch_from_args BATCH --batch_size "$@"
  batch_from_args ACCUM --accum_iter "$@"
  local fix="set BATCH (per GPU) and ACCUM with BATCH x $WORLD GPUs x ACCUM = $EFF, or EFF_BATCH"
  if [ $((EFF % WORLD)) -ne 0 ]; then
    echo "error: effective batch $EFF is not a multiple of $WORLD GPUs ($NNODES nodes x $GPUS_PER_NODE):" \
         "use a GPU count that divides it, or $fix" >&2
    exit 2
  fi
  local per_gpu=$((EFF / WORLD))
  if [ -z "${BATCH:-}" ] && [ -n "${ACCUM:-}" ]; then
    BATCH=$((per_gpu / (ACCUM > 0 ? ACCUM : 1)))
  elif [ -z "${BATCH:-}" ]; then  # the recipe's per-GPU batch, or the largest divisor of per_gpu below it
    BATCH=$(( default < per_gpu ? default : per_gpu ))
    while [ $((per_gpu % BATCH)) -ne 0 ]; do BATCH=$((BATCH - 1)); done
  fi
  ACCUM=${ACCUM:-$((per_gpu / (BATCH > 0 ? BATCH : 1)))}
  if [ "$BATCH" -lt 1 ] || [ "$ACCUM" -lt 1 ] || [ $((BATCH * WORLD * ACCUM)) -ne "$EFF" ]; then
    echo "error: BATCH=$BATCH x $WORLD GPUs x ACCUM=$ACCUM is not the effective batch $EFF: $fix" >&2
    exit 2
  fi
  echo "effective batch $EFF = $BATCH per GPU x $WORLD GPUs ($NNODES nodes x $GPUS_PER_NODE) x accum $ACCUM;" \
       "torchrun rendezvous at $MASTER_ADDR:$MASTER_PORT, this is node $NODE_RANK"
}

# batch_from_args VAR FLAG ARGS...: VAR = FLAG's last value in ARGS (--flag N or --flag=N), which
# main_*.py would take over the preset's; refused when the environment's VAR says otherwise.
batch_from_args() {
  local var=$1 flag=$2 value="" prev=""
  shift 2
  for a in "$@"; do
    [ "$prev" = "$flag" ] && value=$a
    [[ $a == "$flag="* ]] && value=${a#*=}
    prev=$a
  done
  [ -z "$value" ] && return 0
  if ! [[ $value =~ ^[0-9]+$ ]]; then
    echo "error: $flag $value: a positive integer is needed" >&2; exit 2
  fi
  if [ -n "${!var:-}" ] && [ "${!var}" != "$value" ]; then
    echo "error: $var=${!var} and $flag $value disagree: give one of them" >&2; exit 2
  fi
  printf -v "$var" '%s' "$value"
}

# launch CMD...: run CMD (torchrun) and pass signals on, or with DRY_RUN=1 print it (one
# line, shell-quoted) instead. torchrun forwards TERM/INT/HUP/QUIT to its workers but dies of
# SIGUSR1 (SLURM's --signal=USR1@T warning; exit 138) and leaves them without it. So torchrun
# starts with USR1 ignored (kept across exec; the workers install their own handler first) and
# this shell stays its parent: USR1 goes to the workers (torchrun's children), which save at
# their next poll, requeue under SLURM and exit 0; TERM/INT go to torchrun as before.
launch() {
  if [ -n "${DRY_RUN:-}" ]; then
    printf '%q ' "$@"; echo
    exit 0
  fi
  trap '' USR1
  "$@" &
  local pid=$! rc fwd=
  trap 'forward_usr1 "$pid" & fwd=$!' USR1
  trap 'kill -TERM "$pid" 2>/dev/null' TERM
  trap 'kill -INT "$pid" 2>/dev/null' INT
  while true; do  # a trapped signal ends `wait` early (status > 128) while torchrun runs on
    wait "$pid" && rc=0 || rc=$?
    kill -0 "$pid" 2>/dev/null || break
  done
  [ -z "$fwd" ] || kill "$fwd" 2>/dev/null || true  # a forwarder still waiting (set -e safe)
  exit "$rc"
}

# forward_usr1 PID: USR1 to torchrun's workers once each has its handler (USR1 in its caught
# mask): a warning during the start-up, before they exist, would be lost, and a worker still
# starting ignores USR1 (inherited). Not sent twice: a Python process restores USR1's default
# while it exits, so a second one after its save would kill it. One worker is enough (the
# ranks agree on stopping); those caught at the time all get it.
forward_usr1() {
  trap '' USR1
  local child sent=
  while kill -0 "$1" 2>/dev/null; do
    for child in $(pgrep -P "$1"); do
      catches_usr1 "$child" && kill -USR1 "$child" 2>/dev/null && sent=1
    done
    [ -n "$sent" ] && return 0
    sleep 0.2
  done
}

catches_usr1() {  # SIGUSR1 (10) in /proc's SigCgt mask; without /proc, assumed
  local mask
  [ -r "/proc/$1/status" ] || return 0
  mask=$(awk '/^SigCgt:/ {print $2}' "/proc/$1/status" 2>/dev/null)
  [ -n "$mask" ] && (( (16#$mask >> 9) & 1 ))
}
