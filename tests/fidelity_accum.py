"""Gradients of one accumulation group through engine_pretrain.train_one_epoch, against
one batch of the whole group (fp64). Imported by tests/test_fidelity.py and run as a
2-process gloo worker under torchrun:

    python -m torch.distributed.run --nproc_per_node 2 tests/fidelity_accum.py REG ACCUM_REG OUT_JSON
"""
import json
import os
import sys
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models_mae  # noqa: E402
from engine_pretrain import compute_losses, train_one_epoch  # noqa: E402
from util.checkpoint import CheckpointSaver, RunState  # noqa: E402

K, B, SEED = 4, 4, 100  # accumulation steps, micro-batch size per rank, mask seed


def make_args(reg, accum_reg, accum_iter=K):
    lamb = {"none": 0.0, "uniformity": 0.5, "tcr": 0.5}[reg]
    return SimpleNamespace(amp="none", mask_ratio=0.75, reg=reg, lamb=lamb, uniformity_mu=1.0, centering=False,
                           accum_iter=accum_iter, accum_reg=accum_reg, batch_size=B, print_freq=10**9,
                           save_every_steps=0, clip_grad=None, lr=1e-3, min_lr=0.0, warmup_epochs=0, epochs=1,
                           output_dir=None)


def make_model():
    torch.manual_seed(0)
    model = models_mae.MaskedAutoencoderViT(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                                            decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2,
                                            nb_classes=5, norm_pix_loss=True)
    return model.double()


def make_data(n):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 16, 16, generator=g, dtype=torch.float64), torch.randint(0, 5, (n,), generator=g)


class RecordingScaler(torch.amp.GradScaler):
    """A disabled scaler whose step() keeps a copy of the gradients instead of stepping."""

    def __init__(self):
        super().__init__("cpu", enabled=False)
        self.grads = None

    def step(self, optimizer):
        self.grads = [p.grad.detach().clone() for g in optimizer.param_groups for p in g["params"]]


def group_grads(model, model_without_ddp, imgs, targets, args, seed):
    """The parameter gradients train_one_epoch hands to the optimizer after one group."""
    params = [p for p in model_without_ddp.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.0)
    scaler, run = RecordingScaler(), RunState()
    saver = CheckpointSaver(args, model_without_ddp, optimizer, scaler, run, torch.device("cpu"))
    batches = [(imgs[i * B:(i + 1) * B], targets[i * B:(i + 1) * B]) for i in range(args.accum_iter)]
    torch.manual_seed(seed)
    train_one_epoch(model, model_without_ddp, batches, optimizer, scaler, torch.device("cpu"), 0, run, saver, args)
    return scaler.grads


def big_batch_grads(model, imgs, targets, args, seeds):
    """One batch holding every micro-batch, with the masks the engine drew (the same
    draws: torch.rand(B, L) per micro-batch, from each rank's seed in turn)."""
    noise = []
    for seed in seeds:
        torch.manual_seed(seed)
        noise += [torch.rand(B, model.patch_embed.num_patches) for _ in range(K)]
    model.zero_grad(set_to_none=True)
    loss, _, _ = compute_losses(model, imgs, targets, make_args(args.reg, args.accum_reg, 1), torch.cat(noise))
    loss.backward()
    return [p.grad.detach().clone() for p in model.parameters() if p.requires_grad]


def relative_error(a, b):
    num = sum((x - y).pow(2).sum() for x, y in zip(a, b)).sqrt()
    return (num / sum(y.pow(2).sum() for y in b).sqrt()).item()


def main():
    reg, accum_reg, out = sys.argv[1:4]
    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    args = make_args(reg, accum_reg)
    imgs, targets = make_data(world * K * B)
    mine = slice(rank * K * B, (rank + 1) * K * B)
    model = make_model()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    grads = group_grads(ddp, model, imgs[mine], targets[mine], args, SEED + rank)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # the reference is one process
    if rank == 0:
        ref = big_batch_grads(make_model(), imgs, targets, args, [SEED + r for r in range(world)])
        with open(out, "w") as f:
            json.dump({"rel_error": relative_error(grads, ref)}, f)


if __name__ == "__main__":
    main()
