"""One supervised epoch (linear probe or fine-tuning) and the val evaluation.

Per step: (mixup/cutmix) -> forward under autocast -> loss in float32 -> backward
(scaled for fp16, divided by the accumulation group's size) -> optional gradient
clipping on the unscaled gradients -> optimizer step at the end of each group.
The lr follows the per-iteration warmup + cosine schedule, times each group's
lr_scale (layer-wise decay). Nothing is read back to the host except every
print_freq steps.
"""
import contextlib
import math

import torch
import torch.nn.functional as F

from engine_pretrain import NonFiniteLoss, accumulation_groups
from util.amp import autocast
from util.dist import all_reduce_sum
from util.lr_sched import adjust_learning_rate
from util.metric_logger import MetricLogger


def train_one_epoch(model, criterion, data_loader, optimizer, device, epoch, scaler, args,
                    mixup_fn=None, clip_grad=None, log_writer=None):
    model.train()
    logger = MetricLogger()
    num_steps = len(data_loader)
    groups = accumulation_groups(num_steps, args.accum_iter)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    first_bad = torch.full((), -1, dtype=torch.long, device=device)  # step of the first NaN/inf
    lr = optimizer.param_groups[0]["lr"]
    optimizer.zero_grad(set_to_none=True)

    def on_flush(step, values):
        if int(first_bad) >= 0:
            raise NonFiniteLoss(f"non-finite loss at epoch {epoch} step {int(first_bad)} "
                                f"(loss={values.get('loss', math.nan):.4g}); stopping without saving, "
                                "the last checkpoint is intact")
        if log_writer is not None:
            epoch_1000x = int((step / num_steps + epoch) * 1000)  # as MAE: comparable across batch sizes
            for k, v in values.items():
                log_writer.add_scalar(f"train/{k}", v, epoch_1000x)

    world_batch = args.batch_size * args.world_size
    for step, (samples, targets) in enumerate(logger.log_every(
            data_loader, args.print_freq, f"Epoch: [{epoch}]", on_flush=on_flush, batch_size=world_batch)):
        group_start, group_end, group_size = groups[step]
        if group_start:
            lr = adjust_learning_rate(optimizer, epoch + step / num_steps, args)
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)

        # Skip DDP's gradient all-reduce on steps that only accumulate.
        sync = contextlib.nullcontext() if group_end or not args.distributed else model.no_sync()
        with sync:
            with autocast(device, args.amp):
                outputs = model(samples)
            loss = criterion(outputs.float(), targets)
            scaler.scale(loss / group_size).backward()
        if group_end:
            if clip_grad:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

        loss = loss.detach()
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
        logger.update(n=samples.shape[0], loss=loss)
        logger.update(lr=lr)
    return logger.global_avg()


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
