"""Run under torchrun with 1 or 2 processes: total loss (mae + lamb*reg + ce) and the
DDP-averaged gradients for a fixed global batch of 8 images and fixed masks."""
import json
import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import models_mae  # noqa: E402
import util.dist  # noqa: E402
from engine_pretrain import compute_losses  # noqa: E402
from main_pretrain import distributed  # noqa: E402


class PublishedGather(torch.autograd.Function):
    """The published GatherLayer: backward returns only the local slice."""

    @staticmethod
    def forward(ctx, x):
        out = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x)
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        return grads[dist.get_rank()]


def grads_for(model, imgs, targets, noise, args):
    model.zero_grad(set_to_none=True)
    loss, parts, _ = compute_losses(model, imgs, targets, args, noise)
    loss.backward()
    flat = torch.cat([p.grad.flatten() for p in model.module.parameters() if p.grad is not None])
    return loss.item(), parts["loss_reg"].item(), flat


def main(out_path):
    dist.init_process_group("gloo")  # launched by torchrun, also with one process
    rank, world = util.dist.get_rank(), util.dist.get_world_size()
    torch.manual_seed(0)
    imgs, targets, noise = torch.randn(8, 3, 16, 16), torch.arange(8) % 4, torch.rand(8, 16)
    local = slice(rank * 8 // world, (rank + 1) * 8 // world)
    model = models_mae.MaskedAutoencoderViT(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                                            decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2,
                                            nb_classes=4)
    ddp = distributed(model, torch.device("cpu"))  # as main_pretrain builds it (gradient bucket views)
    results = {}
    for name, reg, centering in (("uniformity", "uniformity", False), ("tcr", "tcr", False),
                                 ("tcr_centered", "tcr", True)):
        args = SimpleNamespace(amp="none", mask_ratio=0.75, reg=reg, lamb=1.0, uniformity_mu=1.0,
                               centering=centering)
        total, reg_value, grads = grads_for(ddp, imgs[local], targets[local], noise[local], args)
        # same step with the published gather, to show the difference it makes
        original = util.dist.gather_with_grad
        import loss_func
        loss_func.gather_with_grad = lambda x: torch.cat(PublishedGather.apply(x.contiguous()), 0)
        _, _, grads_published = grads_for(ddp, imgs[local], targets[local], noise[local], args)
        loss_func.gather_with_grad = original
        total_t = torch.tensor([total / world])  # each rank's total holds a local mae/ce mean
        dist.all_reduce(total_t)
        results[name] = {"reg": reg_value, "total": total_t.item(), "grads": grads.tolist(),
                         "grads_published": grads_published.tolist()}
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
