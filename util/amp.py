"""Autocast and gradient scaling for --amp {bf16,fp16,none}."""
import contextlib

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device, amp):
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=DTYPES[amp])


def set_tf32(enabled):
    """--tf32: TF32 (10-bit mantissa) for float32 matmuls and convolutions on CUDA. Off by
    default, as in PyTorch and MAE: with --amp none the run is then really float32."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


@contextlib.contextmanager
def full_fp32_matmul():
    """float32 matmuls in full precision inside, whatever --tf32 (the regulariser's Gram
    matrix, the GPU resize): the flag is process-wide, so callers are on the training thread."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def grad_scaler(device, amp):
    """A GradScaler, active only for fp16 (bf16 has float32's range)."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=amp == "fp16")
