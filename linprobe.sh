#!/usr/bin/env bash
# Linear-probe launcher (MAE's protocol): torchrun on one or many nodes, with the
# published settings for each pretraining recipe of pretrain.sh.
#
#   RECIPE=umae CKPT=runs/umae/checkpoint-199.pth DATA=/path/to/imagenet bash linprobe.sh
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 RECIPE=mae-l CKPT=... DATA=... bash linprobe.sh   # node 0
#   RECIPE=demo bash linprobe.sh        # CPU: probes `make demo`'s output_demo/checkpoint-5.pth
#
# Extra arguments pass through to main_linprobe.py and win over the preset
# (e.g. `bash linprobe.sh --global_pool --output_dir runs/x`). CKPT may be one of
# our pretraining checkpoints or an official MAE file (mae_pretrain_vit_base.pth).
#
# Common to all (REFERENCE.md "linear probe", MAE's main_linprobe.py): LARS,
# weight decay 0, 90 epochs, 10 warmup epochs, BatchNorm(affine=False) + Linear
# head, frozen encoder, cls token. Per recipe:
#   mae / mae-l / mae-h   ViT-B/16, L/16, H/14: blr 0.1, effective batch 16384 (MAE paper
#                         and repository: 512 per GPU x 8 GPUs x accum 4)
#   umae / umae-l         blr 0.1 (MAE's), effective batch 8192 (U-MAE README)
#   mmae / mmae-l         blr 0.05, effective batch 8192 = 256 x 8 GPUs x accum 4
#                         (M-MAE linprobe script, published for ViT-L; ViT-B assumed the same)
# Effective batch = BATCH x GPUs x ACCUM, kept at the recipe's at any GPU count
# (util/launch_env.sh plan_batch: BATCH lowered where needed, else refused); lr = blr x effective batch / 256.
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

EPOCHS=90; WARMUP=10; EXTRA=()
case "$RECIPE" in
  mae)    MODEL=vit_base_patch16;  BLR=0.1;  EFF=16384; DEFAULT_BATCH=512 ;;
  mae-l)  MODEL=vit_large_patch16; BLR=0.1;  EFF=16384; DEFAULT_BATCH=512 ;;
  mae-h)  MODEL=vit_huge_patch14;  BLR=0.1;  EFF=16384; DEFAULT_BATCH=512 ;;
  umae)   MODEL=vit_base_patch16;  BLR=0.1;  EFF=8192;  DEFAULT_BATCH=512 ;;
  umae-l) MODEL=vit_large_patch16; BLR=0.1;  EFF=8192;  DEFAULT_BATCH=512 ;;
  mmae)   MODEL=vit_base_patch16;  BLR=0.05; EFF=8192;  DEFAULT_BATCH=256 ;;
  mmae-l) MODEL=vit_large_patch16; BLR=0.05; EFF=8192;  DEFAULT_BATCH=256 ;;
  # CPU demo on the synthetic images of `make demo` (ViT-Tiny width, 32x32, 4x4 patches);
  # a larger lr than MAE's because LARS steps are tiny at this batch size.
  demo)   MODEL=vit_tiny_patch16;  BLR=0.1;  EFF=64;  DEFAULT_BATCH=64
          CKPT=${CKPT:-output_demo/checkpoint-5.pth}
          EPOCHS=5; WARMUP=1
          EXTRA=(--input_size 32 --patch_size 4 --synthetic_size 1024 --lr 5 --num_workers 2
                 --print_freq 8) ;;
  *) echo "error: unknown RECIPE=$RECIPE (mae, mae-l, mae-h, umae, umae-l, mmae, mmae-l, demo)" >&2; exit 2 ;;
esac
if [ -z "${CKPT:-}" ]; then
  echo "error: set CKPT to the pretrained checkpoint (ours or an official MAE file)" >&2; exit 2
fi

plan_batch "$EFF" "$DEFAULT_BATCH" "$@"
DATA_ARGS=()
[ -n "$DATA" ] && DATA_ARGS=(--data_path "$DATA")

launch "${TORCHRUN[@]}" \
  main_linprobe.py \
  --model "$MODEL" --finetune "$CKPT" --cls_token \
  --batch_size "$BATCH" --accum_iter "$ACCUM" --blr "$BLR" --weight_decay 0 \
  --epochs "$EPOCHS" --warmup_epochs "$WARMUP" \
  --output_dir "${OUTPUT_DIR:-runs/$RECIPE-linprobe}" "${DATA_ARGS[@]}" "${EXTRA[@]}" "$@"
