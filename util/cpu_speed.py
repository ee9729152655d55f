"""float32 nn.Linear on CPU through oneDNN instead of MKL's sgemm (opt-in, CPU only).

PyTorch sends float32 CPU matmuls to MKL. On AMD CPUs MKL's sgemm takes a slow code
path: on this project's CPU machine (AMD EPYC, Zen 5, AVX-512) one core does 41-45
GFLOP/s with it against 90-105 GFLOP/s with oneDNN on the ViT-Tiny layer shapes (see
benchmarks/RESULTS.md). oneDNN, which PyTorch already ships for bf16 matmuls and
inductor's frozen inference, chooses its kernels by instruction set, not by vendor.

use_onednn_linear(model) turns every plain nn.Linear into OneDNNLinear, a subclass with
the same parameters (state_dict keys, checkpoints, DDP and optimizers are unaffected)
whose float32 CPU forward and backward run through oneDNN; results equal nn.Linear's to
float32 rounding. Anything else (CUDA, autocast, other dtypes, a torch without oneDNN)
takes nn.Linear's own path.
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
            grad_w = _mm(g2.t(), x.reshape(-1, x.shape[-1]).t())    # g^T @ x
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
