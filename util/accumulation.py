"""Gradient accumulation, the one rule of every training loop (pretraining, fine-tuning,
linear probing): which steps start and end an optimizer update, which step's backward
all-reduces under DDP, and what each micro-step's loss is divided by.

Epochs hold whole groups only: util.datasets.TrainSampler drops the epoch's leftover
samples that would make a short last group (as MAE, which zeroes them), so every update
is one effective batch and the number of updates per epoch depends only on the dataset
size and the effective batch, at any world size.
"""
import contextlib
from typing import NamedTuple


class Step(NamedTuple):
    first: bool  # starts its group: set the lr; checkpoints and preemption happen here
    last: bool   # ends its group: clip, optimizer step, zero grads
    sync: bool   # its backward all-reduces the group's gradients (DDP)
    runs: int    # the steps of its group that run: each loss is divided by this


def accumulation_plan(num_steps, accum_iter, skipped=()):
    """The Step of each of the epoch's num_steps (a multiple of accum_iter; a resumed epoch
    counts from its first step, a group start). `skipped`: steps stepped over after a
    non-finite loss (--nan_retries), the same on every rank (the non-finite guard agrees
    over ranks).

    The all-reduce goes with the group's last step that runs, not its last step: a skipped
    group end must not leave the group without one, or each rank would step on its own
    gradients. The gradient is the mean over the steps that ran (a skipped step does not
    shrink it). A group whose steps are all skipped has no gradient: no rank steps."""
    if num_steps % accum_iter:
        raise ValueError(f"{num_steps} steps are not whole groups of {accum_iter}")
    plan = []
    for start in range(0, num_steps, accum_iter):
        group = range(start, start + accum_iter)
        ran = [s for s in group if s not in skipped]
        plan += [Step(s == start, s == group[-1], bool(ran) and s == ran[-1], len(ran)) for s in group]
    return plan


def maybe_no_sync(model, sync):
    """DDP's no_sync() on steps that only accumulate (no gradient all-reduce there)."""
    return model.no_sync() if not sync and hasattr(model, "no_sync") else contextlib.nullcontext()
