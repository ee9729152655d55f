"""AdamW with MAE's parameter groups and effective-batch lr scaling."""
import torch
from timm.optim import param_groups_weight_decay

from util.dist import get_world_size


def scale_lr(args):
    """lr = blr * effective batch / 256 unless --lr was given; returns the effective batch."""
    eff_batch = args.batch_size * args.accum_iter * get_world_size()
    if args.lr is None:
        args.lr = args.blr * eff_batch / 256
    return eff_batch


def adamw(model, args, betas=(0.9, 0.95)):
    """MAE's groups (timm 0.3's add_weight_decay with no skip list): no weight decay on
    1-d parameters (norms, biases) and on biases; cls and mask tokens are decayed. The
    fixed position embeddings are not trained, so in no group."""
    groups = param_groups_weight_decay(model, weight_decay=args.weight_decay)
    # One fused kernel for all parameters: CUDA, and CPU since torch 2.4 (2.3-2.8x
    # faster than the per-parameter loop for ViT-Tiny here, benchmarks/cpu_kernels.py).
    fused = torch.device(args.device).type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=args.lr, betas=betas, fused=fused)
