"""Speed of one pretraining step: our path against the official code's choices.

    # CPU target case (ViT-Tiny width, 64x64 images, 8x8 patches, batch 64, fp32)
    python benchmarks/pretrain_speed.py --model mae_vit_tiny_patch16 --input_size 64 \
        --patch_size 8 --batch_size 64 --amp none --device cpu --methods mae,umae,mmae
    # one H100 (bf16 vs the reference's fp16)
    python benchmarks/pretrain_speed.py --model mae_vit_large_patch16 --batch_size 128 --device cuda --compile
    # CI: tiny sizes; also checks that both paths give the same loss, exit 1 if not
    python benchmarks/pretrain_speed.py --smoke

Ours runs engine_pretrain.train_one_epoch itself (accum_iter 1) on a list
of the same synthetic batch: compute_losses under util.amp's autocast (bf16 by default on
CUDA), GradScaler, util.optim.adamw (fused), set-to-none grads, metrics kept on the device
(one host sync per round of steps); SDPA attention (timm's default); optionally torch.compile
(--compile, as main_pretrain). The experiment --cpu_tune (benchmarks/cpu_speed.py, not in the
product: it calls a private oneDNN op) adds oneDNN float32 linears, or unfused attention under
bf16, and glibc malloc keeping freed memory (process-wide, so the reference gains too);
--onednn_linear / --attn unfused for one of them alone.
The reference reproduces the official MAE / U-MAE / M-MAE code's choices in the same
process: unfused attention, fp16 autocast on CUDA / fp32 on CPU, per-parameter AdamW
(foreach=False, fused=False), no compile, a loss.item() and a gradient-norm computation
every step (NativeScalerWithGradNormCount), zero_grad(set_to_none=False) (torch < 2.0
default), torch.cuda.synchronize() every step, and the published regularisers
(normalise after gathering; TCR by torch.logdet of the d x d matrix). Both paths add the
online head's cross-entropy, so they compute the same loss (checked by --smoke / --check).

Timing: warm-up, then `repeats` rounds; in each round every path runs `steps` steps, the
paths' order rotating between rounds so that a noisy shared machine hits all of them alike.
Step times are medians over rounds; speed-ups are ratios of medians from this one run.
Memory ("mem") is the path's own state between steps (weights, gradients it keeps,
optimizer state) plus the peak allocated during one extra step above that: exact on CUDA
(max_memory_allocated), torch's CPU allocator as recorded by the profiler on CPU.
MFU = 3 x forward FLOPs (model_flops_per_image) x images/s / peak, the peak given by
--peak_tflops or measured here by a large matmul in our path's dtype.
"""
import argparse
import contextlib
import copy
import datetime
import io
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from timm.optim import param_groups_weight_decay  # noqa: E402

import models_mae  # noqa: E402
from engine_pretrain import compute_losses, train_one_epoch  # noqa: E402
from util.amp import grad_scaler, set_tf32  # noqa: E402
from util.checkpoint import CheckpointSaver, RunState  # noqa: E402
from cpu_speed import (keep_freed_memory, onednn_available, set_fused_attn, tune_for_cpu,  # noqa: E402
                            use_onednn_linear)
from util.optim import adamw  # noqa: E402

METHODS = {"mae": ("none", 0.0), "umae": ("uniformity", 1e-2), "mmae": ("tcr", 1e-2)}


# ---- FLOPs model ------------------------------------------------------------------
def model_flops_per_image(model, mask_ratio):
    """Forward FLOPs of one image (2 per multiply-add), counted from the architecture:
    patch embedding on all patches, encoder blocks on the visible tokens + cls, decoder
    embedding, decoder blocks on all tokens + cls, prediction head (all tokens + cls, as
    the model computes it) and the online head. Per block: qkv, proj, fc1, fc2 and the
    two attention matmuls (QK^T, AV). Norms, softmax, GELU and the loss are left out
    (< 1% of the total). Training is counted as 3x the forward."""
    num_patches = model.patch_embed.num_patches
    pix = model.patch_size ** 2 * model.in_chans
    t_enc = int(num_patches * (1 - mask_ratio)) + 1
    t_dec = num_patches + 1

    def blocks(mods, t):
        total = 0
        for b in mods:
            d, hidden = b.attn.qkv.in_features, b.mlp.fc1.out_features
            total += 2 * t * d * (3 * d + d + 2 * hidden) + 2 * 2 * t * t * d
        return total

    enc_dim, dec_dim = model.decoder_embed.in_features, model.decoder_embed.out_features
    parts = {
        "patch_embed": 2 * num_patches * pix * enc_dim,
        "encoder": blocks(model.blocks, t_enc),
        "decoder_embed": 2 * t_enc * enc_dim * dec_dim,
        "decoder": blocks(model.decoder_blocks, t_dec),
        "decoder_pred": 2 * t_dec * dec_dim * pix,
        "online_head": 2 * enc_dim * model.online_head.out_features,
    }
    return sum(parts.values()), parts


def measure_peak_tflops(device, dtype, n=None, repeats=5):
    """Best matmul throughput of n x n x n on this device and dtype (TFLOP/s). On CPU
    with float32 the oneDNN kernel is timed too and the faster one counts (MKL's sgemm
    is slow on AMD CPUs, see benchmarks/cpu_speed.py)."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    kernels = {"torch.mm": lambda: a @ b}
    if device.type == "cpu" and dtype == torch.float32:
        if onednn_available():
            kernels["oneDNN"] = lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    best = {}
    for name, f in kernels.items():
        f()
        times = []
        for _ in range(repeats):
            sync(device)
            t = time.perf_counter()
            for _ in range(3):
                f()
            sync(device)
            times.append((time.perf_counter() - t) / 3)
        best[name] = 2 * n ** 3 / min(times) / 1e12
    return max(best.values()), best


# ---- memory ---------------------------------------------------------------------
def state_bytes(model, optimizer):
    """Bytes held between steps: parameters, gradients still allocated, optimizer state."""
    tensors = {}
    for p in model.parameters():
        for t in (p, p.grad):
            if t is not None:
                tensors[t.data_ptr()] = t.numel() * t.element_size()
    for state in optimizer.state.values():
        for t in state.values():
            if torch.is_tensor(t):
                tensors[t.data_ptr()] = t.numel() * t.element_size()
    return sum(tensors.values())


def step_peak_bytes(step, device):
    """Peak bytes allocated during one step above what was allocated before it. CUDA:
    torch.cuda.max_memory_allocated. CPU: the profiler's record of torch's CPU allocator
    (oneDNN's own scratch buffers are not seen)."""
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return max([0] + totals)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- the two training steps -----------------------------------------------------
def our_args(cli, method):
    """The fields of main_pretrain's args that the training loop, compute_losses and
    adamw read (constant lr: no warmup, one epoch)."""
    reg, lamb = METHODS[method]
    return argparse.Namespace(amp=cli.amp, mask_ratio=cli.mask_ratio, reg=reg, lamb=lamb,
                              uniformity_mu=1.0, centering=False, weight_decay=0.05, lr=1e-4,
                              min_lr=0.0, warmup_epochs=0, epochs=1, accum_iter=1,
                              batch_size=cli.batch_size, print_freq=10**9, save_every_steps=0,
                              clip_grad=None, accum_reg="exact", device=str(cli.device))


def our_steps(model, optimizer, scaler, samples, targets, args, n):
    """n steps of engine_pretrain.train_one_epoch itself (one 'epoch' of n batches):
    compute_losses, backward, fused AdamW, on-device metrics, one host sync at the end."""
    run = RunState()
    saver = CheckpointSaver(args, model, optimizer, scaler, run, samples.device)  # saves nothing here
    with contextlib.redirect_stdout(io.StringIO()):  # its end-of-epoch lines
        train_one_epoch(model, model, [(samples, targets)] * n, optimizer, scaler, samples.device, 0, run, saver,
                        args)


def published_regularizer(features, reg, mu=1.0):
    """U-MAE / M-MAE as published, for one process (their gather is then the identity):
    normalise after gathering, Z Z^T of the batch, TCR by logdet of the d x d matrix."""
    z = F.normalize(features)
    if reg == "uniformity":
        return (z @ z.T).pow(2).mean()
    d = z.shape[1]
    return -torch.logdet(torch.eye(d, device=z.device) + mu / d * z.T @ z)


def reference_loss(model, samples, targets, args, noise=None):
    """The official forward: fp16 autocast on CUDA (fp32 on CPU) around everything."""
    with torch.autocast(samples.device.type, dtype=torch.float16, enabled=samples.device.type == "cuda"):
        loss, _, _, features, logits = model(samples, args.mask_ratio, noise)
        if args.reg != "none":
            loss = loss + args.lamb * published_regularizer(features, args.reg, args.uniformity_mu)
        return loss + F.cross_entropy(logits, targets)


def grad_norm(parameters):
    """The official get_grad_norm_, computed every step even without clipping."""
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    return torch.norm(torch.stack([torch.norm(g, 2.0) for g in grads]), 2.0)


def reference_steps(model, optimizer, scaler, samples, targets, args, n):
    for _ in range(n):
        reference_step(model, optimizer, scaler, samples, targets, args)


def reference_step(model, optimizer, scaler, samples, targets, args):
    loss = reference_loss(model, samples, targets, args)
    if not math.isfinite(loss.item()):  # the official host sync, every step
        raise RuntimeError("non-finite loss in the reference path")
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    grad_norm(model.parameters())
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=False)
    sync(samples.device)


def reference_model(model):
    """A copy with the same weights and timm's unfused attention in every block."""
    return set_fused_attn(copy.deepcopy(model), False)


def reference_optimizer(model, lr=1e-4, weight_decay=0.05):
    groups = param_groups_weight_decay(model, weight_decay=weight_decay)  # MAE: no skip list
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), foreach=False, fused=False)


# ---- setup ------------------------------------------------------------------------
def build_model(cli):
    kwargs = dict(img_size=cli.input_size, nb_classes=cli.nb_classes)
    if cli.patch_size:
        kwargs["patch_size"] = cli.patch_size
    return models_mae.MODELS[cli.model](**kwargs)


def compile_model(model, cli):
    return torch.compile(model, backend=cli.compile_backend, mode=cli.compile_mode)


def check_same_loss(fast, ref, samples, targets, cli, methods, num_patches):
    """Our compute_losses and the reference loss on the same weights and the same mask
    (same noise). Returns [(method, ours, reference, tolerance, ok)]."""
    g = torch.Generator(device="cpu").manual_seed(1)
    noise = torch.rand(samples.shape[0], num_patches, generator=g).to(samples.device)
    reduced = cli.amp != "none" or samples.device.type == "cuda"  # bf16/fp16 on either side
    rtol = 2e-2 if reduced else 1e-4
    out = []
    for method in methods:
        args = our_args(cli, method)
        ours, _, _ = compute_losses(fast, samples, targets, args, noise)
        theirs = reference_loss(ref, samples, targets, args, noise)
        a, b = float(ours.detach()), float(theirs.detach())
        out.append((method, a, b, rtol, math.isfinite(a) and abs(a - b) <= rtol * max(abs(b), 1e-6)))
    return out


def warm_up(paths, steps, device, model, optimizer):
    """Untimed steps (compilation included; at least one, as the optimizer creates its
    state in its first step), then one step whose peak memory is taken: the path's own
    state (weights, kept gradients, optimizer state) + the step's peak."""
    for p in paths:
        p.steps(max(steps, 1))
        p.peak = state_bytes(model, optimizer) + step_peak_bytes(lambda: p.steps(1), device)


class Path:
    def __init__(self, name, method, steps):
        self.name, self.method, self.steps = name, method, steps  # steps(n) runs n steps
        self.times, self.peak = [], None


def build(cli, device):
    """Our model (tuned and compiled as main_pretrain would) and the reference copy."""
    model = build_model(cli).to(device)
    ref = reference_model(model) if not cli.no_reference else None  # same initial weights
    set_fused_attn(model, cli.attn == "sdpa")
    if cli.onednn_linear:
        use_onednn_linear(model)
    cli.cpu_tune = device.type == "cpu" and cli.cpu_tune
    cli.malloc_kept = False
    if cli.cpu_tune:
        print(f"tune_for_cpu: {tune_for_cpu(model, cli.amp)}")
        # process-wide, so the reference path gains from it too (no effect on the ratio)
        cli.malloc_kept = keep_freed_memory()
        print(f"keep_freed_memory (glibc malloc, process-wide): {cli.malloc_kept}")
    fused = [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]
    cli.attn = "sdpa" if all(fused) else "unfused" if not any(fused) else "mixed"  # what runs
    fast = compile_model(model, cli) if cli.compile else model
    return model, fast, ref


def make_paths(cli, device, model, fast, ref, samples, targets):
    """Our path per method, then the reference's; each warmed up with its memory taken.
    Ours goes first, before the reference's optimizer state exists."""
    optimizer = adamw(model, our_args(cli, "mae"))
    scaler = grad_scaler(device, cli.amp)
    paths = [Path("ours", m, lambda n, a=our_args(cli, m): our_steps(
        fast, optimizer, scaler, samples, targets, a, n)) for m in cli.methods.split(",")]
    t0 = time.perf_counter()
    warm_up(paths, cli.warmup, device, model, optimizer)
    warmup_s = time.perf_counter() - t0
    if ref is not None:
        ref_optimizer = reference_optimizer(ref)
        ref_scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
        ref_paths = [Path("reference", m, lambda n, a=our_args(cli, m): reference_steps(
            ref, ref_optimizer, ref_scaler, samples, targets, a, n)) for m in cli.methods.split(",")]
        warm_up(ref_paths, cli.warmup, device, ref, ref_optimizer)
        paths += ref_paths
    return paths, warmup_s, bool(optimizer.defaults.get("fused"))


def time_rounds(paths, repeats, steps, device):
    """Each round runs every path for `steps` steps; the order rotates between rounds."""
    for r in range(repeats):
        k = r % len(paths)
        for p in paths[k:] + paths[:k]:
            sync(device)
            t = time.perf_counter()
            p.steps(steps)
            sync(device)
            p.times.append((time.perf_counter() - t) / steps)


def run(cli):
    device = torch.device(cli.device)
    if cli.threads:
        torch.set_num_threads(cli.threads)
    if device.type == "cuda":  # as main_pretrain (--tf32 default off)
        set_tf32(cli.tf32)
    torch.manual_seed(cli.seed)
    samples = torch.randn(cli.batch_size, 3, cli.input_size, cli.input_size, device=device)
    targets = torch.randint(0, cli.nb_classes, (cli.batch_size,), device=device)
    model, fast, ref = build(cli, device)
    flops, flop_parts = model_flops_per_image(model, cli.mask_ratio)

    results = {"checks": []}
    if cli.check and ref is not None:
        results["checks"] = check_same_loss(fast, ref, samples, targets, cli, cli.methods.split(","),
                                            model.patch_embed.num_patches)
        for method, a, b, rtol, ok in results["checks"]:
            print(f"check {method}: ours loss {a:.6f}  reference loss {b:.6f}  rel diff "
                  f"{abs(a - b) / max(abs(b), 1e-6):.2e} (tol {rtol:g})  {'ok' if ok else 'MISMATCH'}")

    paths, warmup_s, fused = make_paths(cli, device, model, fast, ref, samples, targets)
    time_rounds(paths, cli.repeats, cli.steps, device)

    if cli.peak_tflops:
        peak, peak_src = cli.peak_tflops, {"--peak_tflops": cli.peak_tflops}
    else:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cli.amp, torch.float32)
        peak, peak_src = measure_peak_tflops(device, dtype)
    results.update(header(cli, device, flops, flop_parts, peak, peak_src, warmup_s))
    results["fused_adamw"] = fused
    results["paths"] = []
    for p in paths:
        step_s = statistics.median(p.times)
        ips = cli.batch_size / step_s
        results["paths"].append({
            "path": p.name, "method": p.method, "images_per_s": ips, "step_ms": 1e3 * step_s,
            "step_ms_all": [1e3 * t for t in p.times], "peak_mem_mib": p.peak / 2**20,
            "mfu": 3 * flops * ips / (peak * 1e12)})
    return results


def header(cli, device, flops, parts, peak, peak_src, warmup_s):
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads, " \
        f"{torch.backends.cpu.get_cpu_capability()}"
    return {"device": dev, "torch": torch.__version__, "timm": timm.__version__,
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "model": cli.model, "input_size": cli.input_size, "patch_size": cli.patch_size,
            "batch_size": cli.batch_size, "amp": cli.amp, "compile": cli.compile,
            "onednn_linear": cli.onednn_linear, "attn": cli.attn, "cpu_tune": cli.cpu_tune,
            "malloc_kept": cli.malloc_kept,
            "flops_per_image_fwd": flops, "flop_parts": parts,
            "peak_tflops": peak, "peak_source": peak_src, "warmup_s": warmup_s}


def report(res):
    print(f"device {res['device']}; torch {res['torch']}, timm {res['timm']}; {res['date']}")
    print(f"model {res['model']} input {res['input_size']} patch {res['patch_size']} "
          f"batch {res['batch_size']}; ours: amp {res['amp']}, attn {res['attn']}, compile {res['compile']}, "
          f"cpu_tune {res['cpu_tune']}, onednn_linear {res['onednn_linear']}, fused AdamW {res['fused_adamw']}")
    gf = res["flops_per_image_fwd"] / 1e9
    print(f"FLOPs/img: {gf:.4g} GFLOP forward, {3 * gf:.4g} GFLOP per training step (3x); "
          + ", ".join(f"{k} {v / 1e9:.3g}" for k, v in res["flop_parts"].items()))
    src = ", ".join(f"{k} {v:.4g}" for k, v in res["peak_source"].items())
    print(f"peak {res['peak_tflops']:.4g} TFLOP/s ({src}); warm-up {res['warmup_s']:.1f} s")
    ref = {p["method"]: p for p in res["paths"] if p["path"] == "reference"}
    ours = {p["method"]: p for p in res["paths"] if p["path"] == "ours"}
    for p in res["paths"]:
        print(f"{p['path']:9s} {p['method']:4s}  images/s {p['images_per_s']:9.2f}  "
              f"step {p['step_ms']:9.2f} ms (median of {len(p['step_ms_all'])})  "
              f"mem {p['peak_mem_mib']:8.1f} MiB  MFU {100 * p['mfu']:5.1f}%")
    for m, p in ours.items():
        if m in ref:
            print(f"speed-up {m}: {p['images_per_s'] / ref[m]['images_per_s']:.2f}x "
                  f"(ours {p['images_per_s']:.2f} vs reference {ref[m]['images_per_s']:.2f} images/s)")
    if "mae" in ours:
        for m in ("umae", "mmae"):
            if m in ours:
                extra = ours[m]["step_ms"] / ours["mae"]["step_ms"] - 1
                print(f"regulariser cost {m}: step {ours[m]['step_ms']:.2f} ms vs mae "
                      f"{ours['mae']['step_ms']:.2f} ms ({100 * extra:+.1f}%)")


def get_args_parser():
    p = argparse.ArgumentParser("pretraining step speed: ours vs the official code's choices")
    p.add_argument("--model", default="mae_vit_base_patch16", choices=list(models_mae.MODELS))
    p.add_argument("--input_size", default=224, type=int)
    p.add_argument("--patch_size", default=None, type=int)
    p.add_argument("--batch_size", default=64, type=int)
    p.add_argument("--nb_classes", default=1000, type=int)
    p.add_argument("--mask_ratio", default=0.75, type=float)
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"],
                   help="our path's autocast; auto = bf16 on CUDA, none on CPU (as util/cli)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--methods", default="mae", help="comma list of mae, umae, mmae")
    p.add_argument("--warmup", default=3, type=int, help="untimed steps per path (compilation included)")
    p.add_argument("--steps", default=5, type=int, help="steps per timed round")
    p.add_argument("--repeats", default=5, type=int, help="timed rounds (paths alternate)")
    p.add_argument("--peak_tflops", default=None, type=float, help="peak for MFU (default: measured matmul)")
    p.add_argument("--compile", action="store_true", help="torch.compile our model (as main_pretrain --compile)")
    p.add_argument("--tf32", action="store_true", help="TF32 float32 matmuls on CUDA (as main_pretrain --tf32)")
    p.add_argument("--compile_backend", default="inductor")
    p.add_argument("--compile_mode", default=None)
    p.add_argument("--cpu_tune", action="store_true",
                   help="experiment on CPU: cpu_speed.tune_for_cpu (oneDNN linears for fp32 through a "
                        "private op, unfused attention under bf16) and keep_freed_memory; not in main_pretrain")
    p.add_argument("--onednn_linear", action="store_true", help="our nn.Linear through oneDNN on CPU fp32")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "unfused"],
                   help="our attention: SDPA (timm's default) or timm's unfused path")
    p.add_argument("--threads", default=None, type=int, help="torch.set_num_threads")
    p.add_argument("--no_reference", action="store_true", help="time our path only")
    p.add_argument("--check", action="store_true",
                   help="compare the two paths' loss first (exit 1 if not equal)")
    p.add_argument("--smoke", action="store_true", help="tiny CI run with --check")
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--json", default=None, help="also write the results to this file")
    return p


def main(argv=None):
    cli = get_args_parser().parse_args(argv)
    if cli.smoke:
        cli.model, cli.input_size, cli.patch_size, cli.batch_size = "mae_vit_tiny_patch16", 32, 8, 8
        cli.nb_classes, cli.warmup, cli.steps, cli.repeats, cli.check = 10, 1, 1, 2, True
        if cli.methods == "mae":
            cli.methods = "mae,umae,mmae"
    if min(cli.batch_size, cli.steps, cli.repeats) < 1 or cli.warmup < 0:
        sys.exit("error: --batch_size, --steps and --repeats must be >= 1, --warmup >= 0")
    bad = [m for m in cli.methods.split(",") if m not in METHODS]
    if bad:
        sys.exit(f"error: unknown method {bad[0]}; choose from {', '.join(METHODS)}")
    if cli.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no GPU is available")
    if cli.amp == "auto":
        cli.amp = "bf16" if cli.device.startswith("cuda") else "none"
    res = run(cli)
    report(res)
    if cli.json:
        with open(cli.json, "w") as f:
            json.dump(res, f, indent=1)
    if not all(ok for *_, ok in res["checks"]):
        print("error: our loss and the reference loss differ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
