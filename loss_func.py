"""Regularisers against dimensional collapse, on the global batch of encoder features.

Both take the local (B, d) features, gather them over ranks with a gradient that
is correct after DDP averaging (see util.dist.gather_with_grad), L2-normalise the
rows and compute in float32 whatever the autocast dtype. With W ranks of batch B
they give the same value, and the same parameter gradients, as one process with
batch W*B. They also run in a single process without a process group.
"""
import torch
import torch.nn.functional as F

from util.amp import full_fp32_matmul
from util.dist import gather_with_grad


def _global_normalized(features):
    """(B, d) local features -> (m, d) float32 (float64 kept), L2-normalised rows of the global batch."""
    with torch.autocast(device_type=features.device.type, enabled=False):
        z = F.normalize(features.to(torch.promote_types(features.dtype, torch.float32)), dim=1)
        return gather_with_grad(z)


def uniformity_loss(features):
    """U-MAE: mean over all m x m entries (diagonal included) of (Z Z^T)^2.

    ||Z Z^T||_F = ||Z^T Z||_F, so the smaller of the two Gram matrices is formed.
    """
    z = _global_normalized(features)
    m, d = z.shape
    with torch.autocast(device_type=z.device.type, enabled=False), full_fp32_matmul():
        gram = z.T @ z if d < m else z @ z.T
        return gram.pow(2).sum() / (m * m)


def uniformity_loss_TCR(features, uniformity_mu=1.0, centering=False):
    """M-MAE total coding rate: -logdet(I_d + mu/d * Z^T Z).

    Divides by the feature dimension d, as the published code does (its comment
    says m). Centering replaces Z^T Z by Z^T (I - 11^T/m) Z, i.e. Z's rows minus
    their mean. logdet(I_d + a Z^T Z) = logdet(I_m + a Z Z^T): the smaller one is
    used, through a Cholesky factor (the matrix is symmetric positive definite).
    """
    z = _global_normalized(features)
    m, d = z.shape
    with torch.autocast(device_type=z.device.type, enabled=False), full_fp32_matmul():
        if centering:
            z = z - z.mean(dim=0, keepdim=True)
        gram = z.T @ z if d <= m else z @ z.T
        eye = torch.eye(gram.shape[0], device=z.device, dtype=z.dtype)
        # cholesky_ex: no error check, so no host sync on CUDA; the matrix is I + PSD,
        # and a failure would show as a non-finite loss, which the training loop catches.
        chol, _ = torch.linalg.cholesky_ex(eye + (uniformity_mu / d) * gram)
        return -2.0 * torch.log(torch.diagonal(chol)).sum()


REG_CHOICES = ("none", "uniformity", "tcr")
# Spellings of the published U-MAE / M-MAE scripts.
REG_ALIASES = {"spectral": "uniformity", "square": "uniformity", "TCR": "tcr"}


def regularizer_loss(features, reg, uniformity_mu=1.0, centering=False):
    """Dispatch on the canonical --reg name ('none' returns a zero that keeps the graph)."""
    if reg == "uniformity":
        return uniformity_loss(features)
    if reg == "tcr":
        return uniformity_loss_TCR(features, uniformity_mu, centering)
    if reg == "none":
        return features.new_zeros((), dtype=torch.float32)
    raise ValueError(f"unknown regulariser {reg!r}")
