"""Representation diagnostics: is the encoder's feature space collapsing?

On a fixed set of val images, unmasked (mask_ratio 0), the pooled encoder
features z (what the probe and the regulariser see) give:
- the singular value spectrum of the centred feature matrix (from the
  eigenvalues of its d x d scatter matrix),
- effective rank (Roy & Vetterli 2007): exp(H(p)), p_i = s_i / sum_j s_j,
- dims99: how many principal directions hold 99% of the variance,
- uniformity (U-MAE's loss) and TCR (M-MAE's loss) on the L2-normalised features,
  with all m images as one batch (so their scale depends on m, not on the
  training batch);
and, masked at the training ratio with masks fixed per image (reconstruction_loss),
the MAE loss on the same images. None of these needs a label.

Memory stays O(d^2) whatever the number of images: only sums over chunks are
kept (float64), and on several processes each rank sums its own shard and the
sums are added with one all-reduce, so the result equals one process.
"""
import math

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torchvision.transforms.functional import pil_to_tensor

from monitors.features import encode
from monitors.knn import knn_monitor
from util.datasets import eval_loader
from util.dist import all_reduce_sum, is_main_process


class FeatureStats:
    """Running sums over feature chunks: count, sum and Gram matrix of the raw
    features (for the spectrum) and of the L2-normalised ones (uniformity/TCR)."""

    def __init__(self, dim, device="cpu"):
        self.dim = dim
        kw = dict(dtype=torch.float64, device=device)
        self.n = torch.zeros((), **kw)
        self.sum, self.gram = torch.zeros(dim, **kw), torch.zeros(dim, dim, **kw)
        self.nsum, self.ngram = torch.zeros(dim, **kw), torch.zeros(dim, dim, **kw)

    def update(self, z):
        z = z.detach().to(self.gram.device)
        zn = F.normalize(z.float(), dim=1).double()  # as the losses: normalise in fp32
        z = z.double()
        self.n += z.shape[0]
        self.sum += z.sum(0)
        self.gram += z.T @ z
        self.nsum += zn.sum(0)
        self.ngram += zn.T @ zn

    def all_reduce(self):
        """Sum the statistics over ranks (in place; a no-op on one process)."""
        parts = [self.n.view(1), self.sum, self.gram.flatten(), self.nsum, self.ngram.flatten()]
        flat = all_reduce_sum(torch.cat(parts))
        d = self.dim
        sizes = [1, d, d * d, d, d * d]
        n, s, g, ns, ng = torch.split(flat, sizes)
        self.n, self.sum, self.gram = n[0].clone(), s.clone(), g.view(d, d).clone()
        self.nsum, self.ngram = ns.clone(), ng.view(d, d).clone()
        return self

    def compute(self, uniformity_mu=1.0, centering=False):
        if self.n < 2:
            raise ValueError("diagnostics need at least 2 feature vectors")
        m = self.n.item()
        # Scatter of the centred features: sum (z - mean)(z - mean)^T = Z^T Z - m mean mean^T.
        mean = self.sum / m
        scatter = self.gram - m * torch.outer(mean, mean)
        eig = torch.linalg.eigvalsh((scatter + scatter.T) / 2).flip(0).clamp_min(0)
        sv = eig.sqrt()  # singular values of the centred feature matrix
        out = {"singular_values": sv.cpu(), "effective_rank": effective_rank(sv),
               "dims99": dims_for_variance(eig, 0.99), "n": int(m)}
        # U-MAE uniformity: ||Zn Zn^T||_F^2 / m^2 = ||Zn^T Zn||_F^2 / m^2.
        out["uniformity"] = (self.ngram.pow(2).sum() / (m * m)).item()
        out["tcr"] = tcr_from_gram(self.ngram, self.nsum, m, uniformity_mu, centering)
        return out


def effective_rank(singular_values):
    """exp of the entropy of the normalised singular values (Roy & Vetterli 2007)."""
    s = singular_values.double().clamp_min(0)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return math.exp(-(p * p.log()).sum().item())


def dims_for_variance(eigenvalues, fraction=0.99):
    """Smallest k such that the k largest eigenvalues (variances) hold `fraction` of the total."""
    ev = eigenvalues.double().clamp_min(0).sort(descending=True).values
    total = ev.sum()
    if total <= 0:
        return 0
    cum = ev.cumsum(0) / total
    # tolerance: a spectrum holding exactly 99% in k dims counts k, not k+1
    return int((cum < fraction - 1e-12).sum().item()) + 1


def tcr_from_gram(ngram, nsum, m, uniformity_mu=1.0, centering=False):
    """M-MAE's -logdet(I_d + mu/d Zn^T Zn) from the accumulated d x d sums
    (centering: Zn^T (I - 11^T/m) Zn = Zn^T Zn - sum sum^T / m)."""
    d = ngram.shape[0]
    g = ngram - torch.outer(nsum, nsum) / m if centering else ngram
    eye = torch.eye(d, dtype=g.dtype, device=g.device)
    return -torch.linalg.slogdet(eye + (uniformity_mu / d) * (g + g.T) / 2).logabsdet.item()


@torch.no_grad()
def feature_stats(model, loader, device, amp="none", uniformity_mu=1.0, centering=False, global_pool=None):
    """Diagnostics of the model's features over a (rank-sharded) loader."""
    was_training = model.training
    model.eval()
    stats = FeatureStats(model.norm.normalized_shape[0], device)
    for imgs, _ in loader:
        stats.update(encode(model, imgs.to(device, non_blocking=True), amp, (global_pool,)))
    model.train(was_training)
    return stats.all_reduce().compute(uniformity_mu, centering)


@torch.no_grad()
def reconstruction_loss(model, dataset, device, args):
    """Mean MAE loss on `dataset` at args.mask_ratio, in float32. Image i's mask comes from
    row i of a noise table seeded by args.seed alone, so every epoch (and any number of
    ranks) masks the same patches: the values are comparable across epochs, and the
    CPU generator is left as it was."""
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.rand(len(dataset), model.patch_embed.num_patches, generator=g)
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    loader = eval_loader(dataset, args)
    order = list(loader.sampler)
    seen = 0
    for imgs, _ in loader:
        n = imgs.shape[0]
        idx = torch.tensor(order[seen:seen + n])
        seen += n
        loss = model(imgs.to(device), args.mask_ratio, noise[idx].to(device)).loss
        sums += torch.stack([loss.double() * n, torch.tensor(n, device=device, dtype=torch.float64)])
    model.train(was_training)
    total, n = all_reduce_sum(sums).tolist()
    return total / max(n, 1)


def spectrum_plot(singular_values, title="", width=480, height=320):
    """log10 singular values against their index, as a PIL image (no matplotlib)."""
    # float64 eigenvalues of a rank-deficient matrix leave noise near 1e-7 * s_max: cut there
    sv = singular_values.double()
    s = sv.clamp_min(max(sv.max().item(), 1e-12) * 1e-6).log10().tolist()
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 56, width - 12, 24, height - 32
    draw.rectangle([left, top, right, bottom], outline="black")
    lo, hi = math.floor(min(s)), math.ceil(max(s))
    hi = hi if hi > lo else lo + 1
    # y ticks at every power of ten (at most ~8 labels)
    step = max(1, (hi - lo) // 8)
    for e in range(lo, hi + 1, step):
        y = bottom - (e - lo) / (hi - lo) * (bottom - top)
        draw.line([left - 4, y, left, y], fill="black")
        draw.line([left + 1, y, right - 1, y], fill=(225, 225, 225))
        draw.text((4, y - 6), f"1e{e}", fill="black")
    n = len(s)
    for i in range(0, n, max(1, n // 6)):
        x = left + i / max(n - 1, 1) * (right - left)
        draw.line([x, bottom, x, bottom + 4], fill="black")
        draw.text((x - 8, bottom + 6), str(i), fill="black")
    pts = [(left + i / max(n - 1, 1) * (right - left), bottom - (v - lo) / (hi - lo) * (bottom - top))
           for i, v in enumerate(s)]
    if len(pts) > 1:
        draw.line(pts, fill=(31, 119, 180), width=2)
    draw.text((left + 4, 6), title or "singular values of centred features (log10) vs index", fill="black")
    draw.text((right - 60, bottom + 18), "index", fill="black")
    return img


def diag_subset(dataset, num_images):
    """A fixed, evenly spaced subset (class folders are sorted, so all classes show)."""
    n = len(dataset)
    if num_images <= 0 or num_images >= n:
        return dataset
    idx = torch.linspace(0, n - 1, num_images).round().long().unique().tolist()
    return torch.utils.data.Subset(dataset, idx)


def summary_line(d):
    return (f"effective rank {d['effective_rank']:.2f}  dims99 {d['dims99']}  "
            f"uniformity {d['uniformity']:.4f}  tcr {d['tcr']:.4f}  (on {d['n']} val images)")


def label_free_diagnostics(model, images, device, args):
    """(values, console line): the fixed-mask reconstruction loss, and the feature
    diagnostics where there are 2 images or more (a held-out set of 1, the default 1% of a
    small tree, has no spread: those are left out, said in the line, not a crash)."""
    d = {"recon_loss": reconstruction_loss(model, images, device, args)}
    recon = f"reconstruction loss {d['recon_loss']:.4f} at mask ratio {args.mask_ratio} (fixed masks)"
    if len(images) < 2:
        return d, (f"diagnostics: {len(images)} val image: effective rank, uniformity and TCR need 2 "
                   f"or more (raise --holdout); {recon}")
    d.update(feature_stats(model, eval_loader(images, args), device, args.amp, args.uniformity_mu, args.centering))
    return d, "diagnostics: " + summary_line(d) + "; " + recon


def log_diagnostics(model, dataset_val, device, args, epoch, log_writer=None):
    """The pretraining hook: diagnostics and the fixed-mask reconstruction loss on
    --diag_images val images (none needs labels), and with --knn_monitor kNN accuracy;
    logs to TensorBoard and returns log.txt stats.
    Every rank must call it (the sums are all-reduced)."""
    if not getattr(args, "diag_images", 0) and not getattr(args, "knn_monitor", False):
        return {}
    stats = {}
    if args.diag_images:
        d, line = label_free_diagnostics(model, diag_subset(dataset_val, args.diag_images), device, args)
        print(line)
        keys = [k for k in ("effective_rank", "dims99", "uniformity", "tcr", "recon_loss") if k in d]
        stats = {f"diag_{k}": d[k] for k in keys}
        if log_writer is not None and is_main_process():
            for k in keys:
                log_writer.add_scalar(f"diag/{k}", d[k], epoch)
            if "singular_values" in d:
                plot = spectrum_plot(d["singular_values"], f"epoch {epoch}: erank {d['effective_rank']:.1f}")
                log_writer.add_image("diag/spectrum", pil_to_tensor(plot), epoch)
    if getattr(args, "knn_monitor", False):
        acc = knn_monitor(model, dataset_val, device, args)
        print(f"kNN (k={acc['k']}) on {acc['n']} val images: top-1 {acc['acc1']:.2f}  top-5 {acc['acc5']:.2f}")
        stats.update({"val_knn_acc1": acc["acc1"], "val_knn_acc5": acc["acc5"]})
        if log_writer is not None and is_main_process():
            log_writer.add_scalar("val/knn_acc1", acc["acc1"], epoch)
            log_writer.add_scalar("val/knn_acc5", acc["acc5"], epoch)
    return stats
