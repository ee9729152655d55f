"""One epoch of a training loop (engine_pretrain's or engine_finetune's, which the linear
probe runs too) under DDP (2 gloo processes) with steps skipped (--nan_retries'
run.skip_steps) in accumulation groups; writes how far the ranks' weights are apart
after it. Run by tests/test_survival.py:

    python -m torch.distributed.run --nproc_per_node 2 tests/skip_group_end_worker.py ENGINE ACCUM_REG SKIPS OUT_JSON

ENGINE: pretrain | finetune (ACCUM_REG is then unused).

SKIPS: comma-separated steps of epoch 0 to skip (accum_iter 2, 4 steps: groups {0, 1}, {2, 3}).
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import engine_finetune  # noqa: E402
import engine_pretrain  # noqa: E402
import fidelity_accum as fa  # noqa: E402
from util.checkpoint import CheckpointSaver, RunState  # noqa: E402
from util.dist import all_gather_object  # noqa: E402


def main():
    engine, accum_reg, skips, out = sys.argv[1:5]
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    args = fa.make_args("tcr", accum_reg, accum_iter=2)
    model = fa.make_model()
    if engine == "finetune":  # a classifier: the encoder with a fresh head; dropout and drop path off
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 32), torch.nn.GELU(),
                                    torch.nn.Linear(32, 5)).double()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    run = RunState(skip_steps={(0, int(s)) for s in skips.split(",") if s})
    saver = CheckpointSaver(args, model, optimizer, scaler, run, torch.device("cpu"))
    imgs, targets = fa.make_data(2 * 4 * fa.B)  # each rank its own micro-batches, as a sharded loader
    mine = slice(rank * 4 * fa.B, (rank + 1) * 4 * fa.B)
    batches = [(x, y) for x, y in zip(imgs[mine].split(fa.B), targets[mine].split(fa.B))]
    before = [p.detach().clone() for p in model.parameters()]
    torch.manual_seed(fa.SEED + rank)  # the masks differ by rank, as in training
    if engine == "pretrain":
        engine_pretrain.train_one_epoch(ddp, model, batches, optimizer, scaler, torch.device("cpu"), 0, run, saver,
                                        args)
    else:
        engine_finetune.train_one_epoch(ddp, torch.nn.functional.cross_entropy, batches, optimizer, scaler,
                                        torch.device("cpu"), 0, run, saver, args)
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    moved = max((p.detach() - b).abs().max().item() for p, b in zip(model.parameters(), before))
    everyone = all_gather_object(weights)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"max_diff_across_ranks": (everyone[0] - everyone[1]).abs().max().item(),
                       "moved": moved, "steps": int(optimizer.state[next(model.parameters())].get("step", 0))},
                      f)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
