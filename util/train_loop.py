"""The step loop shared by pretraining, linear probing and fine-tuning.

Per step: the caller's step_fn (forward + loss) -> backward, scaled for fp16 and
divided by the accumulation group's size -> at the group's end: optional
clipping on unscaled gradients, optimizer step. The lr follows the per-iteration
warmup + cosine schedule (times each group's lr_scale). Metrics stay on the
device and are read back every print_freq steps only. Group boundaries are
where checkpoints are taken: every --save_every_steps steps and when preemption
is requested (then Preempted is raised after the checkpoint is written).
`evaluate` is the val loop of every entry point, exact over any number of ranks.
"""
import contextlib
import math

import torch
import torch.nn.functional as F

from util import preempt
from util.amp import autocast
from util.dist import all_reduce_sum, is_dist
from util.errors import UserError
from util.lr_sched import adjust_learning_rate
from util.metric_logger import MetricLogger


class NonFiniteLoss(UserError):
    """The loss went NaN/inf; raised before anything is saved from the bad state."""

    def __init__(self, message, epoch=None, step=None):
        super().__init__(message)
        self.epoch, self.step = epoch, step


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


def _first_bad_step(first_bad):
    """Earliest non-finite step over all ranks, or -1 (one host sync)."""
    big = torch.iinfo(torch.long).max
    t = torch.where(first_bad < 0, big, first_bad)
    if is_dist():
        import torch.distributed as dist
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return -1 if int(t) == big else int(t)


def train_steps(model, data_loader, optimizer, scaler, device, epoch, args, step_fn, log_writer=None,
                start_step=0, save_fn=None, clip_grad=None):
    """Run the epoch's steps from start_step; returns the epoch's averaged metrics.

    step_fn(samples, targets) -> (loss, {name: detached tensor}) does the forward.
    save_fn(epoch, next_step, logger_totals) writes a mid-epoch checkpoint.
    Steps in args.skip_steps, as (epoch, step), are skipped (--nan_retries).
    """
    model.train()
    logger = MetricLogger()
    if start_step:  # the resumed epoch's sums so far, so its averages match an uninterrupted run
        logger.totals = {k: list(v) for k, v in (getattr(args, "resume_logger_totals", None) or {}).items()}
    num_steps = start_step + len(data_loader)
    groups = accumulation_groups(num_steps, args.accum_iter)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    skip = getattr(args, "skip_steps", set())
    inject_at = getattr(args, "inject_nonfinite_step", -1)  # test hook (hidden flag)
    first_bad = torch.full((), -1, dtype=torch.long, device=device)  # step of the first NaN/inf
    lr = optimizer.param_groups[0]["lr"]
    stop = False
    optimizer.zero_grad(set_to_none=True)

    def check_finite(values=None):
        bad = _first_bad_step(first_bad)
        if bad >= 0:
            parts = ", ".join(f"{k}={v:.4g}" for k, v in (values or {}).items()
                              if k.startswith("loss") and not math.isfinite(v))
            raise NonFiniteLoss(f"non-finite loss at epoch {epoch} step {bad} ({parts or 'loss'}); "
                                "stopping without saving, the last checkpoint is intact", epoch, bad)

    def on_flush(step, values):
        nonlocal stop
        check_finite(values)
        if args.distributed:  # ranks agree on stopping here, at the same step
            stop = stop or preempt.stop_requested(device)
        if log_writer is not None:
            epoch_1000x = int((step / num_steps + epoch) * 1000)  # as MAE: comparable across batch sizes
            for k, v in values.items():
                log_writer.add_scalar(f"train/{k}", v, epoch_1000x)

    world_batch = args.batch_size * args.world_size
    for step, (samples, targets) in enumerate(logger.log_every(
            data_loader, args.print_freq, f"Epoch: [{epoch}]", total=num_steps, start=start_step,
            on_flush=on_flush, batch_size=world_batch), start=start_step):
        group_start, group_end, group_size = groups[step]
        if group_start:
            group_has_grad = False
            # No pending gradients here: a consistent state to save.
            if step > start_step and save_fn is not None:
                stop = stop or (not args.distributed and preempt.requested_locally())
                if stop or (args.save_every_steps and step % args.save_every_steps == 0):
                    check_finite()
                    save_fn(epoch, step, logger.totals_after_flush())
                if stop:
                    raise preempt.Preempted(f"preempted at epoch {epoch} step {step}")
            lr = adjust_learning_rate(optimizer, epoch + step / num_steps, args)

        if (epoch, step) not in skip:
            samples = samples.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            # Skip DDP's gradient all-reduce on steps that only accumulate.
            sync = contextlib.nullcontext() if group_end or not args.distributed else model.no_sync()
            with sync:
                loss, metrics = step_fn(samples, targets)
                if epoch * num_steps + step == inject_at:
                    loss = loss + float("inf")
                scaler.scale(loss / group_size).backward()
            group_has_grad = True
            loss = loss.detach()
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
            logger.update(n=samples.shape[0], loss=loss, **metrics)
            logger.update(lr=lr)
        if group_end and group_has_grad:
            if clip_grad:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
    check_finite()
    return logger.global_avg()


def run_with_retries(args, run, reload):
    """Call run() (the epoch loop). On a non-finite loss with --nan_retries left,
    reload() the newest checkpoint in output_dir and run again, stepping over the
    offending batch. On preemption (the checkpoint is already written) requeue the
    SLURM job and return normally, so the process exits 0."""
    from util.checkpoint import list_checkpoints
    retries = 0
    while True:
        try:
            return run()
        except NonFiniteLoss as e:
            if retries >= args.nan_retries or not list_checkpoints(args.output_dir):
                raise
            retries += 1
            print(f"{e}\nretry {retries}/{args.nan_retries}: reloading the last checkpoint, "
                  f"skipping epoch {e.epoch} step {e.step}")
            args.skip_steps.add((e.epoch, e.step))
            args.resume, args.auto_resume = "", True
            reload()
        except preempt.Preempted as e:
            print(f"{e}: checkpoint saved, exiting")
            preempt.requeue_if_slurm()
            return None


@torch.no_grad()
def evaluate(model, data_loader, device, args):
    """Top-1/top-5 and cross-entropy on the val split. Each rank takes its own shard
    (util.datasets.ShardSampler, no padding) and the sums are all-reduced, so any
    number of processes gives the numbers of one. Pass the model without DDP: ranks
    may run different numbers of batches."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # top1, top5, loss, n
    for samples, targets in data_loader:
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast(device, args.amp):
            logits = model(samples)
        logits = logits.float()
        topk = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        hit = topk == targets[:, None]
        loss = F.cross_entropy(logits, targets, reduction="sum")
        sums += torch.stack([hit[:, 0].sum(), hit.any(dim=-1).sum(), loss,
                             torch.tensor(len(targets), device=device)]).double()
    all_reduce_sum(sums)
    top1, top5, loss, n = sums.tolist()
    n_ = max(n, 1)
    return {"acc1": 100 * top1 / n_, "acc5": 100 * top5 / n_, "loss": loss / n_, "n": int(n)}
