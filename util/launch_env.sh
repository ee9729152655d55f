# Sourced by pretrain.sh, linprobe.sh and finetune.sh: the torchrun topology from
# the environment (NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, GPUS_PER_NODE;
# under srun on several nodes: SLURM_NNODES, SLURM_NODEID, and MASTER_ADDR = the
# step's first host) and the interpreter (PYTHON, default the project's .venv). Defines WORLD,
# the TORCHRUN command array, and plan_batch / launch for the launchers.
ON_SLURM=0  # the topology comes from the SLURM allocation (srun once per node)
[ -z "${NNODES:-}" ] && [ -n "${SLURM_JOB_ID:-}" ] && [ "${SLURM_NNODES:-1}" -gt 1 ] && ON_SLURM=1
NNODES=${NNODES:-${SLURM_NNODES:-1}}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
if [ "$ON_SLURM" -eq 1 ]; then
  if [ -z "${SLURM_STEP_ID:-}" ]; then  # the batch script runs on the first node only
    echo "error: $NNODES nodes: start $(basename "$0") once per node with" \
         "srun --ntasks-per-node=1 bash $(basename "$0") ..." >&2
    exit 2
  fi
  if [ "${SLURM_STEP_NUM_TASKS:-$NNODES}" -ne "$NNODES" ]; then  # torchrun starts the node's processes
    echo "error: srun started $SLURM_STEP_NUM_TASKS tasks on $NNODES nodes: run $(basename "$0") once per node" \
         "(srun --ntasks-per-node=1)" >&2
    exit 2
  fi
  if [ -z "${MASTER_ADDR:-}" ]; then  # torchrun's rank 0 runs on the step's first host
    MASTER_ADDR=$(scontrol show hostnames "${SLURM_STEP_NODELIST:-$SLURM_JOB_NODELIST}" | head -n 1)
  fi
  MASTER_PORT=${MASTER_PORT:-$((15000 + SLURM_JOB_ID % 10000))}  # as submit_slurm.py
fi
if [ "$NNODES" -gt 1 ]; then  # node 1.. would wait on their own loopback
  case "${MASTER_ADDR:-}" in
    ""|127.*|localhost|::1|0.0.0.0)
      echo "error: NNODES=$NNODES needs MASTER_ADDR = node 0's name or address, the same on every node" \
           "(got '${MASTER_ADDR:-}')" >&2
      exit 2 ;;
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

# plan_batch EFF DEFAULT_BATCH: BATCH per GPU and ACCUM so that BATCH x WORLD x ACCUM is
# exactly the recipe's effective batch EFF (EFF_BATCH overrides it) at this world size.
# BATCH and ACCUM from the environment are kept (and checked); else BATCH is the
# recipe's, lowered when WORLD x BATCH would exceed EFF, and ACCUM makes up the rest.
plan_batch() {
  EFF=${EFF_BATCH:-$1}
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
    BATCH=$(( $2 < per_gpu ? $2 : per_gpu ))
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

# launch CMD...: exec CMD, or with DRY_RUN=1 print it (one line, shell-quoted) instead.
launch() {
  if [ -n "${DRY_RUN:-}" ]; then
    printf '%q ' "$@"; echo
    exit 0
  fi
  exec "$@"
}
