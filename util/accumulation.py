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


def sync_steps(num_steps, accum_iter, skipped):
    """The step of each group whose backward all-reduces the gradients under DDP: the
    group's last step that runs (not in `skipped`). A skipped group end must not leave
    the group without one, or each rank would step on its own local gradients. A group
    whose steps are all skipped has none (no gradient: no rank steps). `skipped` is the
    same on every rank (the non-finite guard agrees on the step over ranks)."""
    out = set()
    for start in range(0, num_steps, accum_iter):
        run = [s for s in range(start, min(start + accum_iter, num_steps)) if s not in skipped]
        out.update(run[-1:])
    return out


def maybe_no_sync(model, sync):
    """DDP's no_sync() on steps that only accumulate (no gradient all-reduce there)."""
    return model.no_sync() if not sync and hasattr(model, "no_sync") else contextlib.nullcontext()
