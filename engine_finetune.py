"""One supervised epoch (linear probe or fine-tuning) and the val evaluation.

Per step, in the order of the lines below: lr for this iteration -> batch to the
device -> mixup/cutmix -> forward under autocast -> loss in float32 -> backward
(scaled for fp16, divided over the accumulation group) -> at the group's end:
unscale, clip, optimizer step, scaler update, zero grads -> metrics (read back
every print_freq steps only). Checkpoints and preemption happen at group starts.
"""
import torch
import torch.nn.functional as F

from util.accumulation import accumulation_plan, maybe_no_sync
from util.amp import autocast
from util.dist import all_reduce_sum, get_world_size
from util.lr_sched import adjust_learning_rate
from util.metric_logger import MetricLogger
from util.survival import NonFiniteGuard


def train_one_epoch(model, criterion, data_loader, optimizer, scaler, device, epoch, run, saver, args,
                    mixup_fn=None, clip_grad=None, log_writer=None):
    """One epoch from run.start_step(epoch); returns the epoch's averaged metrics."""
    model.train()
    start = run.start_step(epoch)
    num_steps = start + len(data_loader)
    skipped = {s for e, s in run.skip_steps if e == epoch}  # stepped over after a non-finite loss (--nan_retries)
    plan = accumulation_plan(num_steps, args.accum_iter, skipped)  # group starts/ends, DDP syncs, loss divisors
    params = [p for g in optimizer.param_groups for p in g["params"]]
    logger, guard = MetricLogger(run.totals_for(epoch)), NonFiniteGuard(epoch, device)

    def on_flush(step, values):  # every print_freq steps: the one host sync
        guard.check(values)
        saver.poll_preemption()
        for k, v in values.items():
            if log_writer is not None:
                log_writer.add_scalar(f"train/{k}", v, int((step / num_steps + epoch) * 1000))

    optimizer.zero_grad(set_to_none=True)
    batches = logger.log_every(data_loader, args.print_freq, f"Epoch: [{epoch}]", total=num_steps, start=start,
                               on_flush=on_flush, batch_size=args.batch_size * get_world_size())
    for step, (samples, targets) in enumerate(batches, start=start):
        at = plan[step]
        if at.first:
            if step > start:
                saver.at_step_boundary(epoch, step, logger, guard)
            lr = adjust_learning_rate(optimizer, epoch + step / num_steps, args)
        if step not in skipped:
            samples = samples.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            if mixup_fn is not None:
                samples, targets = mixup_fn(samples, targets)
            with maybe_no_sync(model, sync=at.sync):
                with autocast(device, args.amp):
                    outputs = model(samples)
                loss = criterion(outputs.float(), targets)
                scaler.scale(loss / at.runs).backward()
            guard.record(step, loss.detach())
            logger.update(n=samples.shape[0], loss=loss.detach(), lr=lr)
        if at.last and any(p.grad is not None for p in params):
            if clip_grad:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
    guard.check()
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
