"""One pretraining epoch and the online-probe evaluation.

Per step: masked forward -> loss = mae + lamb * reg(global features) + CE of the
online head on detached features -> backward (scaled for fp16, divided by the
accumulation group's size) -> optimizer step at the end of each group. The lr
follows a per-iteration warmup + cosine schedule. Nothing is read back to the
host except every print_freq steps.
"""
import contextlib
import math

import torch
import torch.nn.functional as F

from loss_func import regularizer_loss
from util.amp import autocast
from util import preempt
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


def compute_losses(model, samples, targets, args, noise=None):
    """The forward of one step; returns (total, dict of parts, online logits).
    `noise` fixes the mask (tests, benchmarks); None draws a random one."""
    with autocast(samples.device, args.amp):
        loss_mae, _, _, features, logits = model(samples, args.mask_ratio, noise)
    if args.reg != "none" and args.lamb > 0:
        loss_reg = regularizer_loss(features, args.reg, args.uniformity_mu, args.centering)
    else:
        loss_reg = torch.zeros((), device=samples.device)
    loss_ce = F.cross_entropy(logits.float(), targets)
    loss = loss_mae.float() + args.lamb * loss_reg + loss_ce
    return loss, {"loss_mae": loss_mae.detach(), "loss_reg": loss_reg.detach(),
                  "loss_ce": loss_ce.detach()}, logits


def _first_bad_step(first_bad):
    """Earliest non-finite step over all ranks, or -1 (one host sync)."""
    big = torch.iinfo(torch.long).max
    t = torch.where(first_bad < 0, big, first_bad)
    if is_dist():
        import torch.distributed as dist
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return -1 if int(t) == big else int(t)


def train_one_epoch(model, data_loader, optimizer, device, epoch, scaler, args, log_writer=None,
                    start_step=0, save_fn=None):
    """Train from `start_step` to the end of the epoch.

    save_fn(epoch, next_step, logger_totals) writes a mid-epoch checkpoint: every
    --save_every_steps steps, and when preemption is requested (then Preempted is
    raised). Steps listed in args.skip_steps as (epoch, step) are skipped (used
    by --nan_retries to step over a batch that made the loss non-finite).
    """
    model.train()
    logger = MetricLogger()
    logger.totals = dict(getattr(args, "resume_logger_totals", None) or {}) if start_step else {}
    num_steps = start_step + len(data_loader)
    groups = accumulation_groups(num_steps, args.accum_iter)
    first_bad = torch.full((), -1, dtype=torch.long, device=device)  # step of the first NaN/inf
    lr = optimizer.param_groups[0]["lr"]
    stop = {"requested": False}
    optimizer.zero_grad(set_to_none=True)

    def check_finite(values=None):
        bad = _first_bad_step(first_bad)
        if bad >= 0:
            parts = ", ".join(f"{k}={v:.4g}" for k, v in (values or {}).items()
                              if k.startswith("loss") and not math.isfinite(v))
            raise NonFiniteLoss(f"non-finite loss at epoch {epoch} step {bad} ({parts or 'loss'}); "
                                "stopping without saving, the last checkpoint is intact",
                                epoch=epoch, step=bad)

    def on_flush(step, values):
        check_finite(values)
        stop["requested"] = preempt.stop_requested(device) if args.distributed else stop["requested"]
        if log_writer is not None:
            epoch_1000x = int((step / num_steps + epoch) * 1000)  # as MAE: comparable across batch sizes
            for k, v in values.items():
                log_writer.add_scalar(f"train/{k}", v, epoch_1000x)

    header = f"Epoch: [{epoch}]"
    world_batch = args.batch_size * args.world_size
    skip = getattr(args, "skip_steps", set())
    for step, (samples, targets) in enumerate(logger.log_every(
            data_loader, args.print_freq, header, total=num_steps, start=start_step,
            on_flush=on_flush, batch_size=world_batch), start=start_step):
        group_start, group_end, group_size = groups[step]
        if group_start:
            group_has_grad = False
            # A group boundary: no pending gradients, a consistent state to save.
            if step > start_step and save_fn is not None:
                stop["requested"] |= not args.distributed and preempt.requested_locally()
                periodic = args.save_every_steps and step % args.save_every_steps == 0
                if stop["requested"] or periodic:
                    check_finite()
                    save_fn(epoch, step, logger.totals_after_flush())
                if stop["requested"]:
                    raise preempt.Preempted(f"preempted at epoch {epoch} step {step}")
            lr = adjust_learning_rate(optimizer, epoch + step / num_steps, args)

        if (epoch, step) not in skip:
            samples = samples.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            # Skip DDP's gradient all-reduce on steps that only accumulate.
            sync = contextlib.nullcontext() if group_end or not args.distributed else model.no_sync()
            with sync:
                loss, parts, logits = compute_losses(model, samples, targets, args)
                if epoch * num_steps + step == args.inject_nonfinite_step:  # test hook (hidden flag)
                    loss = loss + float("inf")
                scaler.scale(loss / group_size).backward()
            group_has_grad = True
            loss = loss.detach()
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
            acc = (logits.detach().argmax(dim=-1) == targets).float().mean() * 100
            logger.update(n=samples.shape[0], loss=loss, **parts, acc=acc)
            logger.update(lr=lr)
        if group_end and group_has_grad:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
    check_finite()
    return logger.global_avg()


@torch.no_grad()
def evaluate_online(model, data_loader, device, args):
    """Online head's top-1/top-5 on full (unmasked) images. Each rank takes its own
    shard without padding and the counts are summed: equal to one process."""
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # top1, top5, n
    for samples, targets in data_loader:
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast(device, args.amp):
            logits = model.online_predict(samples)
        k = min(5, logits.shape[-1])
        topk = logits.float().topk(k, dim=-1).indices
        hit = topk == targets[:, None]
        counts += torch.stack([hit[:, 0].sum(), hit.any(dim=-1).sum(),
                               torch.tensor(len(targets), device=device)]).double()
    all_reduce_sum(counts)
    top1, top5, n = counts.tolist()
    model.train()
    return {"acc1": 100 * top1 / max(n, 1), "acc5": 100 * top5 / max(n, 1), "n": int(n)}
