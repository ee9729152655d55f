"""Pretraining: one epoch of masked-autoencoder steps, in the order they happen.

Per step: lr for this iteration -> batch to the device -> masked forward under
autocast (reconstruction loss on the masked patches, pooled encoder features,
online head's logits on the detached features) -> regulariser on the global
batch of features (U-MAE uniformity or M-MAE TCR) -> total = mae + lamb * reg +
online cross-entropy -> backward (scaled for fp16, divided over the accumulation
group) -> at the group's end: unscale, clip, optimizer step, scaler update, zero
grads -> metrics (read back every print_freq steps only). Checkpoints and
preemption happen at group starts, where no gradient is pending.
"""
import torch
import torch.nn.functional as F

from loss_func import regularizer_loss
from util.accumulation import accumulation_groups, maybe_no_sync
from util.amp import autocast
from util.dist import get_world_size
from util.lr_sched import adjust_learning_rate
from util.metric_logger import MetricLogger
from util.survival import NonFiniteGuard


def compute_losses(model, samples, targets, args, noise=None):
    """The forward of one step: (total loss, dict of its detached parts, online logits).
    `noise` fixes the mask (tests, benchmarks); None draws a random one."""
    with autocast(samples.device, args.amp):
        out = model(samples, args.mask_ratio, noise)
    if args.reg != "none" and args.lamb > 0:
        loss_reg = regularizer_loss(out.features, args.reg, args.uniformity_mu, args.centering)
    else:
        loss_reg = torch.zeros((), device=samples.device)
    loss_ce = F.cross_entropy(out.logits.float(), targets)  # online head; its input is detached
    loss = out.loss.float() + args.lamb * loss_reg + loss_ce
    return loss, {"loss_mae": out.loss.detach(), "loss_reg": loss_reg.detach(),
                  "loss_ce": loss_ce.detach()}, out.logits


def train_one_epoch(model, data_loader, optimizer, scaler, device, epoch, run, saver, args, log_writer=None):
    """One epoch from run.start_step(epoch); returns the epoch's averaged metrics."""
    model.train()
    start = run.start_step(epoch)
    num_steps = start + len(data_loader)
    groups = accumulation_groups(num_steps, args.accum_iter)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    logger, guard = MetricLogger(run.totals_for(epoch)), NonFiniteGuard(epoch, device)

    def on_flush(step, values):  # every print_freq steps: the one host sync
        guard.check(values)
        saver.poll_preemption()
        for k, v in values.items():
            if log_writer is not None:  # x axis in 1/1000 epochs, as MAE: comparable across batch sizes
                log_writer.add_scalar(f"train/{k}", v, int((step / num_steps + epoch) * 1000))

    optimizer.zero_grad(set_to_none=True)
    batches = logger.log_every(data_loader, args.print_freq, f"Epoch: [{epoch}]", total=num_steps, start=start,
                               on_flush=on_flush, batch_size=args.batch_size * get_world_size())
    for step, (samples, targets) in enumerate(batches, start=start):
        first, last, group_size = groups[step]
        if first:
            if step > start:
                saver.at_step_boundary(epoch, step, logger, guard)
            lr = adjust_learning_rate(optimizer, epoch + step / num_steps, args)
        if (epoch, step) not in run.skip_steps:  # stepped over after a non-finite loss (--nan_retries)
            samples = samples.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            with maybe_no_sync(model, sync=last):  # DDP all-reduces gradients at the group's end only
                loss, parts, logits = compute_losses(model, samples, targets, args)
                scaler.scale(loss / group_size).backward()
            loss = loss.detach()
            guard.record(step, loss)
            acc = (logits.detach().argmax(dim=-1) == targets).float().mean() * 100
            logger.update(n=samples.shape[0], loss=loss, **parts, acc=acc, lr=lr)
        if last and any(p.grad is not None for p in params):
            if args.clip_grad:
                scaler.unscale_(optimizer)  # clip the true gradient, not the fp16-scaled one
                torch.nn.utils.clip_grad_norm_(params, args.clip_grad)
            scaler.step(optimizer)  # skipped by the scaler if fp16 gradients overflowed
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
    guard.check()
    return logger.global_avg()
