"""Cost of the exact regulariser under gradient accumulation (--accum_reg exact, the
default with --accum_iter > 1 and a regulariser) against the per-micro-batch one
(--accum_reg micro): time per optimizer step of engine_pretrain.train_one_epoch, the two
alternating in the same process, median over repeats.

    python benchmarks/accum_cost.py --device cpu --threads 1       # ViT-Tiny width, 64 px, patch 8
    python benchmarks/accum_cost.py --device cuda --model mae_vit_base_patch16 --input_size 224 \
        --batch_size 64 --accum_iter 4 --amp bf16
"""
import argparse
import contextlib
import io
import os
import statistics
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models_mae  # noqa: E402
from engine_pretrain import train_one_epoch  # noqa: E402
from util.amp import grad_scaler  # noqa: E402
from util.checkpoint import CheckpointSaver, RunState  # noqa: E402
from util.optim import adamw  # noqa: E402


def get_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mae_vit_tiny_patch16")
    p.add_argument("--input_size", default=64, type=int)
    p.add_argument("--patch_size", default=8, type=int)
    p.add_argument("--depth", default=6, type=int)
    p.add_argument("--batch_size", default=32, type=int, help="micro-batch")
    p.add_argument("--accum_iter", default=4, type=int)
    p.add_argument("--reg", default="tcr", choices=["uniformity", "tcr"])
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", default=None, type=int)
    p.add_argument("--groups", default=2, type=int, help="optimizer steps per timed round")
    p.add_argument("--repeats", default=5, type=int)
    return p.parse_args()


def main():
    cli = get_args()
    if cli.threads:
        torch.set_num_threads(cli.threads)
    device = torch.device(cli.device)
    torch.manual_seed(0)
    model = models_mae.MODELS[cli.model](img_size=cli.input_size, patch_size=cli.patch_size, depth=cli.depth,
                                         norm_pix_loss=True, nb_classes=100).to(device)
    n = cli.batch_size
    data = [(torch.randn(n, 3, cli.input_size, cli.input_size, device=device),
             torch.randint(0, 100, (n,), device=device)) for _ in range(cli.accum_iter * cli.groups)]
    base = dict(amp=cli.amp, mask_ratio=0.75, reg=cli.reg, lamb=0.01, uniformity_mu=1.0, centering=False,
                accum_iter=cli.accum_iter, batch_size=n, print_freq=10**9, save_every_steps=0, clip_grad=None,
                lr=1e-4, min_lr=0.0, warmup_epochs=0, epochs=1, weight_decay=0.05, device=str(device))
    optimizer = adamw(model, SimpleNamespace(**base))
    scaler = grad_scaler(device, cli.amp)

    def run(mode):
        args = SimpleNamespace(**base, accum_reg=mode)
        run_state = RunState()
        saver = CheckpointSaver(args, model, optimizer, scaler, run_state, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            train_one_epoch(model, model, data, optimizer, scaler, device, 0, run_state, saver, args)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / cli.groups

    modes = ["micro", "exact"]
    for m in modes:  # warm-up
        run(m)
    times = {m: [] for m in modes}
    for r in range(cli.repeats):
        for m in (modes if r % 2 == 0 else modes[::-1]):
            times[m].append(run(m))
    med = {m: statistics.median(v) for m, v in times.items()}
    print(f"{cli.model} depth {cli.depth} at {cli.input_size} px, patch {cli.patch_size}, micro-batch {n} x "
          f"accum {cli.accum_iter}, {cli.reg}, amp {cli.amp}, {device}, threads {torch.get_num_threads()}")
    for m in modes:
        print(f"  {m:5s}: {med[m] * 1000:8.1f} ms per optimizer step (median of {cli.repeats}; "
              f"all: {', '.join(f'{t * 1000:.0f}' for t in times[m])})")
    print(f"exact_over_micro={med['exact'] / med['micro']:.3f} overhead={100 * (med['exact'] / med['micro'] - 1):.1f}%")


if __name__ == "__main__":
    main()
