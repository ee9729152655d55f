#!/usr/bin/env bash
# Fine-tuning launcher (MAE's protocol): torchrun on one or many nodes, with the
# published settings for each pretraining recipe of pretrain.sh.
#
#   RECIPE=mae CKPT=runs/mae/checkpoint-199.pth DATA=/path/to/imagenet bash finetune.sh
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 RECIPE=mae-l CKPT=... DATA=... bash finetune.sh   # node 0
#   RECIPE=demo bash finetune.sh        # CPU: fine-tunes `make demo`'s output_demo/checkpoint-5.pth
#
# Extra arguments pass through to main_finetune.py and win over the preset.
#
# Common to all (REFERENCE.md "fine-tune", MAE repository FINETUNE.md): AdamW,
# weight decay 0.05, 5 warmup epochs, mixup 0.8, cutmix 1.0, label smoothing 0.1,
# RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, global pooling,
# effective batch 1024. Per recipe:
#   mae, umae, mmae   ViT-B/16: blr 5e-4, layer decay 0.65, drop path 0.1, 100 epochs
#                     (FINETUNE.md; U-MAE uses MAE's; M-MAE published no ViT-B fine-tuning)
#   mae-l, umae-l     ViT-L/16: blr 1e-3, layer decay 0.75, drop path 0.2, 50 epochs
#                     (MAE's FINETUNE.md, as checked in REFERENCE.md; not the ViT-B
#                     blr 5e-4)
#   mae-h             ViT-H/14: blr 1e-3, layer decay 0.75, drop path 0.3, 50 epochs (FINETUNE.md)
#   mmae-l            ViT-L/16: blr 5e-4, layer decay 0.65, drop path 0.1, 100 epochs,
#                     effective batch 2048 (M-MAE finetune.sh)
# Effective batch = BATCH x GPUs x ACCUM, kept at the recipe's at any GPU count
# (util/launch_env.sh plan_batch: BATCH lowered where needed, else refused); lr = blr x effective batch / 256.
# Per GPU at most 128 for ViT-B, 32 for ViT-L and 16 for ViT-H (MAE's FINETUNE.md per-GPU
# batches: ViT-L/H fine-tuning at 128 runs out of memory on an 80 GB GPU); BATCH, ACCUM or
# --batch_size / --accum_iter among the extra arguments change the split, not the effective batch.
set -euo pipefail
# Relative DATA, CKPT and OUTPUT_DIR name the caller's folder, not the repository
# (cd below); paths in extra arguments are relative to the repository.
for v in DATA CKPT OUTPUT_DIR; do
  if [ -n "${!v:-}" ] && [[ ${!v} != /* ]]; then printf -v "$v" '%s' "$PWD/${!v}"; fi
done
cd "$(dirname "$0")"

RECIPE=${RECIPE:-mae}
DATA=${DATA:-}
source util/launch_env.sh

EFF=1024; WARMUP=5; DEFAULT_BATCH=128; EXTRA=()
case "$RECIPE" in
  mae|umae|mmae)  MODEL=vit_base_patch16;  BLR=5e-4; LD=0.65; DP=0.1; EPOCHS=100 ;;
  mae-l|umae-l)   MODEL=vit_large_patch16; BLR=1e-3; LD=0.75; DP=0.2; EPOCHS=50; DEFAULT_BATCH=32 ;;
  mae-h)          MODEL=vit_huge_patch14;  BLR=1e-3; LD=0.75; DP=0.3; EPOCHS=50; DEFAULT_BATCH=16 ;;
  mmae-l)         MODEL=vit_large_patch16; BLR=5e-4; LD=0.65; DP=0.1; EPOCHS=100; EFF=2048; DEFAULT_BATCH=32 ;;
  # CPU demo on the synthetic images of `make demo` (ViT-Tiny width, 32x32, 4x4 patches).
  demo)           MODEL=vit_tiny_patch16;  BLR=1e-3; LD=0.75; DP=0.1; EPOCHS=3; WARMUP=1; EFF=64; DEFAULT_BATCH=64
                  CKPT=${CKPT:-output_demo/checkpoint-5.pth}
                  EXTRA=(--input_size 32 --patch_size 4 --synthetic_size 1024 --num_workers 2
                         --print_freq 8) ;;
  *) echo "error: unknown RECIPE=$RECIPE (mae, umae, mmae, mae-l, umae-l, mae-h, mmae-l, demo)" >&2; exit 2 ;;
esac
if [ -z "${CKPT:-}" ]; then
  echo "error: set CKPT to the pretrained checkpoint (ours or an official MAE file)" >&2; exit 2
fi

plan_batch "$EFF" "$DEFAULT_BATCH" "$@"
DATA_ARGS=()
[ -n "$DATA" ] && DATA_ARGS=(--data_path "$DATA")

launch "${TORCHRUN[@]}" \
  main_finetune.py \
  --model "$MODEL" --finetune "$CKPT" --global_pool \
  --batch_size "$BATCH" --accum_iter "$ACCUM" --blr "$BLR" --layer_decay "$LD" \
  --drop_path "$DP" --epochs "$EPOCHS" --warmup_epochs "$WARMUP" --weight_decay 0.05 \
  --mixup 0.8 --cutmix 1.0 --smoothing 0.1 --aa rand-m9-mstd0.5-inc1 --reprob 0.25 \
  --output_dir "${OUTPUT_DIR:-runs/$RECIPE-finetune}" "${DATA_ARGS[@]}" "${EXTRA[@]}" "$@"
