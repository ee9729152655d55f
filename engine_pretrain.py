"""Pretraining: one epoch of masked-autoencoder steps, in the order they happen.

Per step: lr for this iteration -> batch and its mask noise (drawn in the loader,
per sample: the masks follow the samples, not the ranks) to the device -> masked
forward under autocast (reconstruction loss on the masked patches, pooled encoder features,
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
from util.accumulation import accumulation_plan, maybe_no_sync
from util.amp import autocast
from util.dist import get_world_size
from util.lr_sched import adjust_learning_rate
from util.metric_logger import MetricLogger
from util.survival import NonFiniteGuard


def compute_losses(model, samples, targets, args, noise=None, reg_grad=None, loss_reg=None):
    """The forward of one step: (loss to back-propagate, dict of detached loss parts,
    online logits). `noise` fixes the mask (each sample's, from the loader; tests);
    None draws a random one. With `reg_grad` (exact regulariser under accumulation,
    see regulariser_grads) the regulariser's gradient w.r.t. these features was already
    computed on the whole group: the loss then carries <features, reg_grad> in its place
    and `loss_reg` is its value, for the log."""
    with autocast(samples.device, args.amp):
        out = model(samples, args.mask_ratio, noise)
    if reg_grad is not None:
        reg_term = (out.features.to(reg_grad.dtype) * reg_grad).sum()
    elif args.reg != "none" and args.lamb > 0:
        loss_reg = regularizer_loss(out.features, args.reg, args.uniformity_mu, args.centering)
        reg_term = args.lamb * loss_reg
    else:
        loss_reg = reg_term = torch.zeros((), device=samples.device)
    fp32 = torch.promote_types(out.logits.dtype, torch.float32)  # float64 kept (tests)
    parts = {"loss_mae": out.loss.detach(), "loss_reg": loss_reg.detach()}
    loss = out.loss.to(fp32) + reg_term
    if getattr(args, "online_probe", True):  # off for unlabeled sources: targets are -1
        loss_ce = F.cross_entropy(out.logits.to(fp32), targets)  # online head; its input is detached
        loss, parts["loss_ce"] = loss + loss_ce, loss_ce.detach()
    else:  # the unused head still takes part in the backward: DDP needs a gradient for every parameter
        loss = loss + 0.0 * out.logits.sum()
    return loss, parts, out.logits


def exact_accumulation(args):
    """Whether the regulariser sees the whole effective batch under --accum_iter (default)."""
    return args.accum_iter > 1 and args.reg != "none" and args.lamb > 0 and args.accum_reg == "exact"


@torch.no_grad()
def regulariser_grads(model, batches, group_size, args):
    """The exact regulariser of an accumulation group (a gradient cache): every
    micro-batch's features with its mask (its noise, or one drawn here; encoder only, no graph), the
    regulariser on all of them at once (and all ranks: loss_func gathers), and its
    gradient w.r.t. each micro-batch's features, times group_size (each micro-batch's
    loss is divided by it: the group's steps that run). The second pass, compute_losses with the same noise,
    back-propagates <features, grad>: the parameter gradient then equals one batch of
    the whole group's. Returns [(noise, grad, reg value)] per micro-batch. `model`
    without DDP/compile wrappers."""
    noises, feats = [], []
    for _, samples, _, noise in batches:
        if noise is None:
            noise = torch.rand(samples.shape[0], model.patch_embed.num_patches, device=samples.device)
        with autocast(samples.device, args.amp):
            latent, _, _ = model.forward_encoder(samples, args.mask_ratio, noise)
            f = model.pooled_features(latent)
            feats.append(f.to(torch.promote_types(f.dtype, torch.float32)))
        noises.append(noise)
    with torch.enable_grad():
        z = torch.cat(feats).requires_grad_(True)
        reg = regularizer_loss(z, args.reg, args.uniformity_mu, args.centering)
        (grad,) = torch.autograd.grad(args.lamb * group_size * reg, z)
    return [(n, g, reg.detach()) for n, g in zip(noises, grad.split([f.shape[0] for f in feats]))]


def train_one_epoch(model, feature_model, data_loader, optimizer, scaler, device, epoch, run, saver, args,
                    log_writer=None):
    """One epoch from run.start_step(epoch); returns the epoch's averaged metrics. `model` is
    what trains (DDP/compile wrapped); `feature_model` is what regulariser_grads runs the
    encoder of: the bare model, or main_pretrain.CompiledFeatures under --compile."""
    model.train()
    start = run.start_step(epoch)
    num_steps = start + len(data_loader)
    skipped = {s for e, s in run.skip_steps if e == epoch}  # stepped over after a non-finite loss (--nan_retries)
    plan = accumulation_plan(num_steps, args.accum_iter, skipped)  # group starts/ends, DDP syncs, loss divisors
    exact = exact_accumulation(args)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    logger, guard = MetricLogger(run.totals_for(epoch)), NonFiniteGuard(epoch, device)

    def on_flush(step, values):  # every print_freq steps: the one host sync
        guard.check(values)
        saver.poll_preemption()
        for k, v in values.items():
            if log_writer is not None:  # x axis in 1/1000 epochs, as MAE: comparable across batch sizes
                log_writer.add_scalar(f"train/{k}", v, int((step / num_steps + epoch) * 1000))

    optimizer.zero_grad(set_to_none=True)
    pending = []  # the group's batches not yet run: one at a time, or the whole group when exact
    batches = logger.log_every(data_loader, args.print_freq, f"Epoch: [{epoch}]", total=num_steps, start=start,
                               on_flush=on_flush, batch_size=args.batch_size * get_world_size())
    for step, (samples, targets, *noise) in enumerate(batches, start=start):
        at = plan[step]
        if at.first:
            if step > start:
                saver.at_step_boundary(epoch, step, logger, guard)
            lr = adjust_learning_rate(optimizer, epoch + step / num_steps, args)
        if step not in skipped:
            # the loader's per-sample mask noise; batches of (samples, targets) alone (benchmarks)
            # get masks drawn in the model
            noise = noise[0].to(device, non_blocking=True) if noise else None
            pending.append((step, samples.to(device, non_blocking=True), targets.to(device, non_blocking=True),
                            noise))
        if exact and not at.last:
            continue  # the exact regulariser needs the features of the whole group first
        cache = regulariser_grads(feature_model, pending, at.runs, args) if exact and pending else None
        for i, (k, samples, targets, noise) in enumerate(pending):
            noise, reg_grad, loss_reg = cache[i] if cache else (noise, None, None)
            with maybe_no_sync(model, sync=plan[k].sync):
                loss, parts, logits = compute_losses(model, samples, targets, args, noise, reg_grad, loss_reg)
                scaler.scale(loss / at.runs).backward()
            guard.record(k, loss.detach())
            total = parts["loss_mae"].float() + args.lamb * parts["loss_reg"] + parts.get("loss_ce", 0)
            if "loss_ce" in parts:
                parts["acc"] = (logits.detach().argmax(dim=-1) == targets).float().mean() * 100
            logger.update(n=samples.shape[0], loss=total, **parts, lr=lr)
        pending = []
        if at.last and any(p.grad is not None for p in params):
            if args.clip_grad:
                scaler.unscale_(optimizer)  # clip the true gradient, not the fp16-scaled one
                torch.nn.utils.clip_grad_norm_(params, args.clip_grad)
            scaler.step(optimizer)  # skipped by the scaler if fp16 gradients overflowed
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
    guard.check()
    return logger.global_avg()
