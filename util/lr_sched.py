"""Per-iteration learning-rate schedule: linear warmup, then half-cycle cosine."""
import math


def lr_at(epoch, args):
    """Learning rate at a fractional epoch (e.g. 3.25 = a quarter into epoch 3)."""
    if epoch < args.warmup_epochs:
        return args.lr * epoch / args.warmup_epochs
    progress = (epoch - args.warmup_epochs) / max(args.epochs - args.warmup_epochs, 1e-8)
    progress = min(progress, 1.0)
    return args.min_lr + (args.lr - args.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def adjust_learning_rate(optimizer, epoch, args):
    """Set every group's lr (scaled by its `lr_scale`, used by layer-wise decay)."""
    lr = lr_at(epoch, args)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr
