"""Autocast and gradient scaling for --amp {bf16,fp16,none}."""
import contextlib

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device, amp):
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=DTYPES[amp])


def grad_scaler(device, amp):
    """A GradScaler, active only for fp16 (bf16 has float32's range)."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=amp == "fp16")
