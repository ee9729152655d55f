"""CPU-only speed choices for training; the maths is unchanged (benchmarks/RESULTS.md, Speed).

tune_for_cpu(model, amp) applies the one that pays for the run's precision:

- float32 (amp none): every plain nn.Linear becomes OneDNNLinear, whose forward and
  backward run through oneDNN instead of MKL's sgemm. On this project's CPU machine (AMD
  EPYC Zen 5, AVX-512, one core) MKL does 89-98 GFLOP/s on the ViT-Tiny MAE layer shapes
  and oneDNN 203-220, 2.1-2.3x (benchmarks/cpu_kernels.py; MKL likely takes its generic
  path on non-Intel CPUs; not measured on Intel, where the two should be close). Same
  parameters, state_dict keys, checkpoints, DDP and optimizer; results equal
  nn.Linear's to float32 rounding.
- bf16/fp16 autocast: timm's unfused attention instead of SDPA, whose CPU flash kernel is
  5-10x slower forward+backward in bf16 at 17 and 65 tokens (1.7-4x at 50-257); in
  float32 SDPA is as fast or faster than unfused, so it stays there.

The oneDNN linear is a torch.library custom op with its own backward op, so
torch.compile keeps both as kernels and fuses the elementwise work around them.
Anything that is not a CPU float32 linear (CUDA, autocast, a torch without oneDNN)
takes nn.Linear's own path, so calling this on a CUDA model changes nothing.
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def onednn_available():
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _autocast_on():
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def _mm_nt(a, b, bias=None):
    """a @ b.T (+ bias) with oneDNN (2-d float32; b may be a strided view, read in place)."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


# Custom ops (not an autograd.Function) so that torch.compile keeps them as opaque
# kernels and fuses the elementwise work around them; the backward is itself an op.
@torch.library.custom_op("mae_cpu::linear", mutates_args=())
def onednn_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return _mm_nt(x.reshape(-1, x.shape[-1]), weight, bias).reshape(*x.shape[:-1], weight.shape[0])


@onednn_linear.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("mae_cpu::linear_backward", mutates_args=())
def onednn_linear_backward(grad: Tensor, x: Tensor, weight: Tensor, need_x: bool,
                           need_w: bool) -> Tuple[Tensor, Tensor]:
    """(grad_x = g @ W, grad_w = g^T @ x); an unneeded one is returned empty."""
    g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
    grad_x = _mm_nt(g2, weight.t()).reshape(x.shape) if need_x else x.new_empty(0)
    if not need_w:
        grad_w = weight.new_empty(0)
    elif g2.shape[1] <= x2.shape[1]:
        # The contraction runs over the rows: copy the narrower operand transposed and
        # let oneDNN read the other as a strided view.
        grad_w = _mm_nt(g2.t().contiguous(), x2.t())
    else:
        grad_w = _mm_nt(x2.t().contiguous(), g2.t()).t().contiguous()
    return grad_x, grad_w


@onednn_linear_backward.register_fake
def _(grad, x, weight, need_x, need_w):
    return (torch.empty_like(x) if need_x else x.new_empty(0),
            torch.empty_like(weight) if need_w else weight.new_empty(0))


def _save(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad
    grad_x, grad_w = onednn_linear_backward(grad, x, weight, need_x, need_w)
    grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and need_b else None
    return (grad_x if need_x else None), (grad_w if need_w else None), grad_b


onednn_linear.register_autograd(_backward, setup_context=_save)


class OneDNNLinear(nn.Linear):
    def forward(self, x):
        if (x.device.type == "cpu" and x.dtype == torch.float32 and self.weight.dtype == torch.float32
                and not _autocast_on()):
            return onednn_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def use_onednn_linear(model):
    """Switch model's plain nn.Linear modules to OneDNNLinear in place; returns how many
    (none on a torch without oneDNN)."""
    if not onednn_available():
        return 0
    n = 0
    for m in model.modules():
        if type(m) is nn.Linear:
            m.__class__ = OneDNNLinear
            n += 1
    return n


def set_fused_attn(model, fused):
    """timm Attention modules: F.scaled_dot_product_attention (fused) or q @ k^T, softmax, @ v."""
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused
    return model


def keep_freed_memory():
    """glibc malloc: serve blocks up to 32 MiB from the heap and never trim it, instead
    of mmap/munmap per large tensor. A CPU training step otherwise frees and re-faults
    its activations every step (20,000-50,000 page faults per ViT-Tiny step here, 8-9% of
    its time); the CUDA caching allocator does the same for GPU memory. Process-wide;
    returns False where there is no glibc mallopt (nothing changed)."""
    import ctypes
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def tune_for_cpu(model, amp):
    """The CPU choices above for a model that trains with --amp `amp`; returns what was done."""
    if amp == "none":
        return f"{use_onednn_linear(model)} linears through oneDNN"
    set_fused_attn(model, False)
    return "unfused attention"
