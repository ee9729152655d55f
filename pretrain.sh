#!/usr/bin/env bash
# Pretraining launcher: torchrun on one or many nodes, with the U-MAE / M-MAE papers'
# pretraining budget for all three methods.
#
#   RECIPE=umae DATA=/path/to/imagenet bash pretrain.sh                # 1 node, all its GPUs
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 RECIPE=mmae-l DATA=... bash pretrain.sh   # on node 0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 RECIPE=mmae-l DATA=... bash pretrain.sh   # on node 1
#
# Extra arguments pass through to main_pretrain.py and win over the preset
# (e.g. `bash pretrain.sh --epochs 800 --output_dir runs/x`). Under SLURM, run
# this script once per node with srun (NODE_RANK from SLURM_NODEID).
#
# Recipes (REFERENCE.md): the U-MAE / M-MAE budget, 200 epochs, blr 1.5e-4, weight
# decay 0.05, mask 0.75, norm_pix_loss, 40 warmup epochs, 8 GPUs x 128 = effective
# batch 1024. `mae` is MAE's model and loss at that budget, not MAE's published
# 800-1600 epochs at batch 4096 (README_mae.md has that command).
#   mae     ViT-B/16, reconstruction only
#   umae    ViT-B/16, + 1e-2 * uniformity          (U-MAE)
#   mmae    ViT-B/16, + 1e-2 * TCR, mu 1           (M-MAE)
#   mae-l / umae-l / mmae-l: ViT-L/16 (M-MAE uses mu 3 for ViT-L)
# LAMB defaults to the published 1e-2 and means the same at any GPU count: our
# regulariser gradient is world-size invariant. The published 8-GPU runs applied
# only 1/8 of it (their gather's backward); LAMB=1.25e-3 reproduces their actual
# training dynamics (PRETRAIN.md, "lamb and GPU count").
set -euo pipefail
# Relative DATA and OUTPUT_DIR name the caller's folder, not the repository
# (cd below); paths in extra arguments are relative to the repository.
for v in DATA OUTPUT_DIR; do
  if [ -n "${!v:-}" ] && [[ ${!v} != /* ]]; then printf -v "$v" '%s' "$PWD/${!v}"; fi
done
cd "$(dirname "$0")"

RECIPE=${RECIPE:-mae}
LAMB=${LAMB:-1e-2}
DATA=${DATA:-}
source util/launch_env.sh

# 8 x 128 = 1024 images per update at any GPU count: 16 GPUs x 64, 1 GPU x 128 x accum 8.
plan_batch 1024 128 "$@"

case "$RECIPE" in
  mae)    MODEL=mae_vit_base_patch16;  REG=(--reg none) ;;
  umae)   MODEL=mae_vit_base_patch16;  REG=(--reg uniformity --lamb "$LAMB") ;;
  mmae)   MODEL=mae_vit_base_patch16;  REG=(--reg tcr --lamb "$LAMB" --uniformity_mu 1 --centering False) ;;
  mae-l)  MODEL=mae_vit_large_patch16; REG=(--reg none) ;;
  umae-l) MODEL=mae_vit_large_patch16; REG=(--reg uniformity --lamb "$LAMB") ;;
  mmae-l) MODEL=mae_vit_large_patch16; REG=(--reg tcr --lamb "$LAMB" --uniformity_mu 3 --centering False) ;;
  *) echo "error: unknown RECIPE=$RECIPE (mae, umae, mmae, mae-l, umae-l, mmae-l)" >&2; exit 2 ;;
esac

DATA_ARGS=()
[ -n "$DATA" ] && DATA_ARGS=(--data_path "$DATA")

launch "${TORCHRUN[@]}" \
  main_pretrain.py \
  --model "$MODEL" --batch_size "$BATCH" --accum_iter "$ACCUM" \
  --epochs 200 --warmup_epochs 40 --blr 1.5e-4 --weight_decay 0.05 \
  --mask_ratio 0.75 --norm_pix_loss "${REG[@]}" \
  --output_dir "${OUTPUT_DIR:-runs/$RECIPE}" "${DATA_ARGS[@]}" "$@"
