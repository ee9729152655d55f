"""Reconstruction pictures: original | masked | reconstruction | reconstruction + visible."""
import math
import os

import torch
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image

from util.datasets import IMAGENET_MEAN, IMAGENET_STD

CAPTION = ("columns: original | masked input | reconstruction | reconstruction with the visible "
           "patches pasted in. With norm_pix_loss the model predicts normalised patches; they are "
           "shown de-normalised with each patch's mean and variance taken from the original image.")


# Smaller inputs are enlarged (nearest, so patch edges stay sharp) to at least this many
# pixels a side: a 64 px grid of 8 rows is otherwise too small to read.
MIN_SIDE = 192


def pick_across_classes(dataset, n=8):
    """Indices of n images spread over the classes, the same every run: the first image of
    n classes evenly spaced over the sorted class list (then the second image of each, ...,
    when there are fewer classes than n). Without `targets`, evenly spaced indices."""
    targets = getattr(dataset, "targets", None)
    if targets is None or len(targets) != len(dataset) or not len(dataset):
        return [round(i * (len(dataset) - 1) / max(n - 1, 1)) for i in range(min(n, len(dataset)))]
    by_class = {}
    for i, t in enumerate(int(t) for t in targets):
        by_class.setdefault(t, []).append(i)
    classes = sorted(by_class)
    chosen = [classes[c * len(classes) // min(n, len(classes))] for c in range(min(n, len(classes)))]
    picks = []
    for rank in range(max(len(v) for v in by_class.values())):
        picks += [by_class[c][rank] for c in chosen if rank < len(by_class[c])]
        if len(picks) >= n:
            break
    return picks[:n]


def _to_unit(x):
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x * std + mean).clamp(0, 1)


@torch.no_grad()
def reconstruction_grid(model, imgs, mask_ratio, seed=0):
    """A (3, H, W) picture for the images in `imgs` (normalised tensors), each row
    one image. The mask is drawn from `seed`, so pictures of successive epochs match."""
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(imgs.shape[0], model.patch_embed.num_patches, generator=g).to(imgs.device)
    out = model(imgs, mask_ratio, noise)
    pred, mask = out.pred.float(), out.mask
    if model.norm_pix_loss:
        target = model.patchify(imgs)
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        pred = pred * (var + 1.0e-6) ** 0.5 + mean
    rec = model.unpatchify(pred)
    m = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, pred.shape[-1]))
    original, rec = _to_unit(imgs), _to_unit(rec)
    masked = original * (1 - m) + 0.5 * m
    pasted = original * (1 - m) + rec * m
    rows = torch.stack([original, masked, rec, pasted], dim=1).flatten(0, 1)
    if rows.shape[-1] < MIN_SIDE:
        rows = F.interpolate(rows, scale_factor=math.ceil(MIN_SIDE / rows.shape[-1]), mode="nearest")
    model.train(was_training)
    return make_grid(rows.cpu(), nrow=4, padding=2, pad_value=1.0)


def save_reconstructions(model, imgs, mask_ratio, output_dir, epoch, log_writer=None):
    grid = reconstruction_grid(model, imgs, mask_ratio)
    path = os.path.join(output_dir, f"reconstruction-{epoch}.png")
    save_image(grid, path)
    if log_writer is not None:
        log_writer.add_image("reconstruction", grid, epoch)
        log_writer.add_text("reconstruction/caption", CAPTION, epoch)
    return path
