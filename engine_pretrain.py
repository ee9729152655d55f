"""One pretraining epoch and the online-probe evaluation.

Per step: masked forward -> loss = mae + lamb * reg(global features) + CE of the
online head on detached features; backward, accumulation, the lr schedule and
checkpoints at step boundaries are util.train_loop's (shared with evaluation).
"""
import torch
import torch.nn.functional as F

from loss_func import regularizer_loss
from util.amp import autocast
from util.train_loop import evaluate, train_steps


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


def train_one_epoch(model, data_loader, optimizer, device, epoch, scaler, args, log_writer=None,
                    start_step=0, save_fn=None):
    """One pretraining epoch from start_step (see util.train_loop.train_steps)."""
    def step_fn(samples, targets):
        loss, parts, logits = compute_losses(model, samples, targets, args)
        acc = (logits.detach().argmax(dim=-1) == targets).float().mean() * 100
        return loss, {**parts, "acc": acc}

    return train_steps(model, data_loader, optimizer, scaler, device, epoch, args, step_fn,
                       log_writer, start_step, save_fn)


class OnlineProbe(torch.nn.Module):
    """The online head on full images (mask ratio 0, no decoder), as a classifier."""

    def __init__(self, mae):
        super().__init__()
        self.mae = mae

    def forward(self, imgs):
        return self.mae.online_predict(imgs)


def evaluate_online(model, data_loader, device, args):
    """Online head's top-1/top-5 on the val split, exact over any number of ranks
    (util.train_loop.evaluate). Pass the model without DDP."""
    return evaluate(OnlineProbe(model), data_loader, device, args)
