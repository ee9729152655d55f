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

Anything that is not a CPU float32 linear (CUDA, autocast, torch.compile, a torch without
oneDNN) takes nn.Linear's own path, so calling this on a CUDA model changes nothing.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def onednn_available():
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _autocast_on():
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def _mm(a, b_t):
    """a @ b_t.T with oneDNN (both 2-d float32)."""
    return torch.ops.mkldnn._linear_pointwise(a, b_t, None, "none", [], "")


class _OneDNNLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        x2 = x.reshape(-1, x.shape[-1])
        y = torch.ops.mkldnn._linear_pointwise(x2, weight, bias, "none", [], "")
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _mm(g2, weight.t()).reshape(x.shape)           # g @ W
        if ctx.needs_input_grad[1]:
            grad_w = _mm(g2.t(), x.reshape(-1, x.shape[-1]).t())    # g^T @ x (transposes copied, still faster)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0)
        return grad_x, grad_w, grad_b


class OneDNNLinear(nn.Linear):
    def forward(self, x):
        # Under torch.compile, inductor lowers this oneDNN op only for constant (frozen)
        # weights, so compiled models keep F.linear.
        if (x.device.type == "cpu" and x.dtype == torch.float32 and self.weight.dtype == torch.float32
                and not _autocast_on() and not torch.compiler.is_compiling() and onednn_available()):
            return _OneDNNLinearFn.apply(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def use_onednn_linear(model):
    """Switch model's plain nn.Linear modules to OneDNNLinear in place; returns how many."""
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


def tune_for_cpu(model, amp):
    """The CPU choices above for a model that trains with --amp `amp`; returns what was done."""
    if amp == "none":
        return f"{use_onednn_linear(model) if onednn_available() else 0} linears through oneDNN"
    set_fused_attn(model, False)
    return "unfused attention"
