"""Gradient accumulation: which steps start and end an optimizer update."""
import contextlib


def accumulation_groups(num_steps, accum_iter):
    """For each step: (first step of its group?, last step of its group?, group size).

    The last group of an epoch may be shorter than accum_iter (e.g. an epoch of 3
    steps with accum_iter 8): it still updates, with its gradient averaged over
    the steps it has, so no data is silently dropped and every epoch updates.
    """
    out = []
    for start in range(0, num_steps, accum_iter):
        size = min(accum_iter, num_steps - start)
        out += [(i == 0, i == size - 1, size) for i in range(size)]
    return out


def maybe_no_sync(model, sync):
    """DDP's no_sync() on steps that only accumulate (no gradient all-reduce there)."""
    return model.no_sync() if not sync and hasattr(model, "no_sync") else contextlib.nullcontext()
