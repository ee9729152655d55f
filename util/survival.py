"""Surviving bad steps: a non-finite loss stops the run before anything is saved
from the bad state, and --nan_retries reloads the last checkpoint and steps over
the offending batch. Preemption (util/preempt.py) returns normally after its
checkpoint, so the process exits 0 and SLURM requeues it."""
import math

import torch

from util import preempt
from util.checkpoint import list_checkpoints
from util.dist import all_reduce_min, broadcast_object
from util.errors import UserError


class NonFiniteLoss(UserError):
    """The loss went NaN/inf; raised before anything is saved from the bad state."""

    def __init__(self, message, epoch=None, step=None):
        super().__init__(message)
        self.epoch, self.step = epoch, step


class NonFiniteGuard:
    """Remembers on the device (no host sync per step) the first step of the epoch
    whose loss was NaN/inf; check() reads it back, agreed over ranks, and raises."""

    def __init__(self, epoch, device):
        self.epoch = epoch
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)

    def record(self, step, loss):
        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(loss), step, self.first_bad)

    def check(self, values=None):
        big = torch.iinfo(torch.long).max
        bad = int(all_reduce_min(torch.where(self.first_bad < 0, big, self.first_bad)))
        if bad != big:
            parts = ", ".join(f"{k}={v:.4g}" for k, v in (values or {}).items()
                              if k.startswith("loss") and not math.isfinite(v))
            raise NonFiniteLoss(f"non-finite loss at epoch {self.epoch} step {bad} ({parts or 'loss'}); "
                                "stopping without saving, the last checkpoint is intact", self.epoch, bad)


def run_with_retries(args, run, train, reload):
    """Call train() (the epoch loop). On a non-finite loss with --nan_retries left,
    add the bad step to run.skip_steps (the same step on every rank: the guard agrees
    over ranks), reload() the newest checkpoint (rank 0's choice) and train again. On
    preemption (its checkpoint is already written) requeue the SLURM job and return
    normally, so the process exits 0."""
    retries = 0
    while True:
        try:
            return train()
        except NonFiniteLoss as e:
            if retries >= args.nan_retries or not broadcast_object(bool(list_checkpoints(args.output_dir))):
                raise
            retries += 1
            print(f"{e}\nretry {retries}/{args.nan_retries}: reloading the last checkpoint, "
                  f"skipping epoch {e.epoch} step {e.step}")
            run.skip_steps.add((e.epoch, e.step))
            reload()
        except preempt.Preempted as e:
            print(f"{e}: checkpoint saved, exiting")
            preempt.requeue_if_slurm()
            return None
