"""One supervised epoch (linear probe or fine-tuning) and the val evaluation.

Per step: (mixup/cutmix) -> forward under autocast -> loss in float32. Backward,
accumulation, gradient clipping, the lr schedule (times each group's lr_scale
for layer-wise decay), the NaN check and mid-epoch checkpoints are
util.train_loop's, shared with pretraining.
"""
import torch
import torch.nn.functional as F

from util.amp import autocast
from util.dist import all_reduce_sum
from util.train_loop import train_steps


def train_one_epoch(model, criterion, data_loader, optimizer, device, epoch, scaler, args,
                    mixup_fn=None, clip_grad=None, log_writer=None, start_step=0, save_fn=None):
    def step_fn(samples, targets):
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        with autocast(device, args.amp):
            outputs = model(samples)
        return criterion(outputs.float(), targets), {}

    return train_steps(model, data_loader, optimizer, scaler, device, epoch, args, step_fn,
                       log_writer, start_step, save_fn, clip_grad)


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
