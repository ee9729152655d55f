"""Fine-tune a pretrained encoder end to end, MAE's protocol: AdamW with layer-wise
lr decay, drop path, mixup/cutmix with label smoothing, RandAugment and random
erasing, warmup + cosine schedule, global pooling.

    python main_finetune.py --model vit_tiny_patch16 --input_size 32 --patch_size 4 \
        --finetune output_dir/checkpoint-0.pth              # CPU demo, synthetic data
    torchrun --nproc_per_node 8 main_finetune.py --model vit_base_patch16 \
        --finetune mae_pretrain_vit_base.pth --batch_size 128 --blr 5e-4 --layer_decay 0.65 \
        --epochs 100 --drop_path 0.1 --data_path /imagenet
    python main_finetune.py --eval --resume output_dir/checkpoint-best.pth ...
"""
if __name__ == "__main__":  # first: SLURM's TERM/USR1 during the imports below (seconds) ask for a checkpoint
    from util import preempt  # instead of killing the run (preempt imports no torch)
    preempt.install_handlers()
import torch
import torch.nn as nn
from timm.data import Mixup, create_transform
from timm.layers import trunc_normal_
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay

from util.cli import Parser, add_common_args
from util.datasets import IMAGENET_MEAN, IMAGENET_STD
from util.errors import UserError, exit_on_user_error
from eval_setup import add_eval_args, build_data, build_model, check_eval_args, prepare, run
from util.optim import scale_lr


def get_args_parser():
    parser = Parser("Fine-tuning of a pretrained MAE / U-MAE / M-MAE encoder", add_help=True)
    # main_finetune.py defaults of the MAE repository (blr 1e-3, layer decay 0.75, 50 epochs);
    # the published per-model recipes are presets in finetune.sh.
    add_common_args(parser, batch_size=64, epochs=50, input_size=224)
    parser.set_defaults(blr=1e-3, weight_decay=0.05, warmup_epochs=5, min_lr=1e-6)
    add_eval_args(parser, model="vit_large_patch16", global_pool=True)
    g = parser.add_argument_group("fine-tuning")
    g.add_argument("--layer_decay", type=float, default=0.75, help="layer-wise lr decay")
    g.add_argument("--drop_path", type=float, default=0.1, help="stochastic depth rate")
    g.add_argument("--clip_grad", type=float, default=None, help="clip the gradient norm (off by default)")
    g = parser.add_argument_group("augmentation (timm)")
    g.add_argument("--aa", default="rand-m9-mstd0.5-inc1", help="RandAugment policy ('' = none)")
    g.add_argument("--color_jitter", type=float, default=None,
                   help="colour jitter strength (timm applies it only without --aa, as in MAE)")
    g.add_argument("--reprob", type=float, default=0.25, help="random erasing probability")
    g.add_argument("--remode", default="pixel", help="random erasing mode")
    g.add_argument("--recount", type=int, default=1, help="random erasing count")
    g.add_argument("--resplit", action="store_true",
                   help="MAE's flag, accepted and ignored (MAE never passes it on: there are no augmentation splits)")
    g.add_argument("--mixup", type=float, default=0.8, help="mixup alpha (0 = off)")
    g.add_argument("--cutmix", type=float, default=1.0, help="cutmix alpha (0 = off)")
    g.add_argument("--cutmix_minmax", type=float, nargs=2, default=None, help="cutmix ratio range")
    g.add_argument("--mixup_prob", type=float, default=1.0, help="probability of mixup or cutmix per batch")
    g.add_argument("--mixup_switch_prob", type=float, default=0.5, help="probability of cutmix instead of mixup")
    g.add_argument("--mixup_mode", default="batch", choices=["batch", "pair", "elem"])
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    return parser


def check_finetune_args(args):
    """Fail early on values that cannot work; returns notes for the start of the log."""
    if not 0 < args.layer_decay <= 1:
        raise UserError(f"--layer_decay must be in (0, 1], got {args.layer_decay}")
    if not 0 <= args.drop_path < 1:
        raise UserError(f"--drop_path must be in [0, 1), got {args.drop_path}")
    if mixup_active(args) and args.batch_size % 2:
        raise UserError(f"mixup/cutmix need an even --batch_size, got {args.batch_size}")
    notes = []
    if args.resplit:
        notes.append("--resplit ignored, as in MAE (no augmentation splits)")
    if args.color_jitter is not None and args.aa and "3a" not in args.aa:  # timm's rule
        notes.append(f"--color_jitter {args.color_jitter:g} has no effect with --aa {args.aa} (timm, as in MAE)")
    return notes


def check_args(args):
    """Every flag check that needs no process group (submit_slurm.py runs it too)."""
    return check_finetune_args(args) + check_eval_args(args)


def mixup_active(args):
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


def train_transform(args):
    """MAE's fine-tuning augmentation through timm (color jitter is off with RandAugment)."""
    return create_transform(input_size=args.input_size, is_training=True, color_jitter=args.color_jitter,
                            auto_augment=args.aa or None, interpolation="bicubic", re_prob=args.reprob,
                            re_mode=args.remode, re_count=args.recount, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def mixup_and_criterion(args):
    """Mixup/cutmix (which also smooths the labels) with soft-target CE, else
    label-smoothing CE, else plain CE."""
    if mixup_active(args):
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=args.nb_classes)
        return mixup_fn, SoftTargetCrossEntropy()
    if args.smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return None, nn.CrossEntropyLoss()


def build_optimizer(model, args):
    """AdamW (betas 0.9, 0.999 as MAE's fine-tuning) on layer-decayed groups: with
    models_vit's group_matcher timm gives MAE's scales decay^(depth + 1 - layer_id),
    layer_id 0 for patch_embed/cls_token/pos_embed, i + 1 for block i, depth + 1
    for norm/fc_norm/head. No weight decay on 1-d tensors, cls_token, pos_embed."""
    groups = param_groups_layer_decay(model, weight_decay=args.weight_decay,
                                      no_weight_decay_list=model.no_weight_decay(), layer_decay=args.layer_decay)
    # One fused kernel for all parameters (CUDA, and CPU since torch 2.4), as util/optim.adamw.
    return torch.optim.AdamW(groups, lr=args.lr, fused=torch.device(args.device).type in ("cuda", "cpu"))


@exit_on_user_error
def main(args):
    device = prepare(args, check_args(args))
    data = build_data(args, train_transform(args))
    model = build_model(args, drop_path_rate=args.drop_path)
    if args.finetune and not args.eval:
        trunc_normal_(model.head.weight, std=2e-5)  # MAE: a near-zero start for the new head
    model.to(device)
    scale_lr(args)
    optimizer = build_optimizer(model, args)
    mixup_fn, criterion = mixup_and_criterion(args)
    return run(args, device, model, optimizer, data, criterion, mixup_fn, args.clip_grad)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
