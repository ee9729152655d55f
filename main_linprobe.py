"""Linear probe of a pretrained encoder, MAE's protocol: frozen encoder,
BatchNorm1d(affine=False) + Linear head trained with LARS (weight decay 0,
blr 0.1, 90 epochs, 10 warmup), RandomResizedCrop + flip.

    python main_linprobe.py --model vit_tiny_patch16 --input_size 32 --patch_size 4 \
        --finetune output_dir/checkpoint-0.pth              # CPU demo, synthetic data
    torchrun --nproc_per_node 8 main_linprobe.py --model vit_base_patch16 \
        --finetune mae_pretrain_vit_base.pth --batch_size 512 --accum_iter 4 --data_path /imagenet
    python main_linprobe.py --eval --resume output_dir/checkpoint-best.pth ...
"""
if __name__ == "__main__":  # first: SLURM's TERM/USR1 during the imports below (seconds) ask for a checkpoint
    from util import preempt  # instead of killing the run (preempt imports no torch)
    preempt.install_handlers()
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.optim import Lars

from util.cli import Parser, add_common_args
from eval_setup import add_eval_args, build_data, build_model, check_eval_args, linprobe_transform, prepare, run
from util.errors import exit_on_user_error
from util.optim import scale_lr


def get_args_parser():
    parser = Parser("Linear probe of a pretrained MAE / U-MAE / M-MAE encoder", add_help=True)
    add_common_args(parser, batch_size=512, epochs=90, input_size=224)
    parser.set_defaults(blr=0.1, weight_decay=0.0, warmup_epochs=10)  # MAE's linear probe
    add_eval_args(parser, model="vit_large_patch16", global_pool=False)  # MAE probes the cls token
    return parser


def check_args(args):
    """Every flag check that needs no process group (submit_slurm.py runs it too)."""
    return check_eval_args(args)


PROBE_BN_EPS = 1e-6  # MAE's; main_export folds the BatchNorm into the linear layer with it


def add_probe_head(model):
    """MAE's head: BatchNorm without affine (features of any scale, as in MoCo v3)
    then the linear layer, initialised with std 0.01; everything else frozen."""
    trunc_normal_(model.head.weight, std=0.01)
    nn.init.zeros_(model.head.bias)
    model.head = nn.Sequential(nn.BatchNorm1d(model.head.in_features, affine=False, eps=PROBE_BN_EPS), model.head)
    return model.freeze_encoder()


def lars(head, args):
    """timm's Lars set up as MAE's LARS (momentum 0.9, trust coefficient 0.001): the
    trust ratio and weight decay apply to weight matrices only, biases get plain
    momentum SGD. With MAE's weight decay 0 the update equals MAE's exactly (up to
    timm's eps 1e-8); with weight decay timm divides by |g| + wd|w|, not |g + wd w|."""
    matrices = [p for p in head.parameters() if p.ndim > 1]
    vectors = [p for p in head.parameters() if p.ndim <= 1]
    return Lars([{"params": matrices, "weight_decay": args.weight_decay, "always_adapt": True},
                 {"params": vectors, "weight_decay": 0.0, "always_adapt": False}],
                lr=args.lr, momentum=0.9, trust_coeff=0.001)


@exit_on_user_error
def main(args):
    device = prepare(args, check_args(args))
    data = build_data(args, linprobe_transform(args.input_size))
    model = add_probe_head(build_model(args)).to(device)
    scale_lr(args)
    optimizer = lars(model.head, args)
    return run(args, device, model, optimizer, data, nn.CrossEntropyLoss())


if __name__ == "__main__":
    main(get_args_parser().parse_args())
