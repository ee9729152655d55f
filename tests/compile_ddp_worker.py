"""One training step's DDP-averaged gradients, torch.compile(DDP(model)) against eager
DDP, with the regulariser on (2 gloo processes under torchrun; tests/test_gpu_path.py):

    python -m torch.distributed.run --nproc_per_node 2 tests/compile_ddp_worker.py REG OUT_JSON
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine_pretrain import compute_losses  # noqa: E402
from main_pretrain import distributed  # noqa: E402
from test_gpu_path import data, step_args, tiny  # noqa: E402


def grads(model, samples, targets, args, noise):
    model.zero_grad(set_to_none=True)
    loss, _, _ = compute_losses(model, samples, targets, args, noise)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.module.parameters() if p.grad is not None]


def main():
    reg, out = sys.argv[1:3]
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    args = step_args(amp="none", reg=reg)
    (samples, targets), = data(seed=rank)  # each rank its own batch
    torch.manual_seed(rank)
    model = distributed(tiny(), torch.device("cpu"))  # as main_pretrain builds it (gradient bucket views)
    assert model.gradient_as_bucket_view
    noise = torch.rand(samples.shape[0], model.module.patch_embed.num_patches)
    loss_e, eager = grads(model, samples, targets, args, noise)
    loss_c, compiled = grads(torch.compile(model, backend="inductor"), samples, targets, args, noise)
    worst = max(((c - e).abs().max() / e.abs().max().clamp_min(1e-12)).item() for c, e in zip(compiled, eager))
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"loss_eager": loss_e.item(), "loss_compiled": loss_c.item(), "worst_rel": worst,
                       "n_grads": len(eager)}, f)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
