"""GPU acceptance: the one command to run on the day a GPU is there.

    python benchmarks/gpu_acceptance.py            # on CUDA: everything below, then a dated
                                                   # section appended to benchmarks/RESULTS.md
    python benchmarks/gpu_acceptance.py --quick    # the same sequence at tiny shapes (CPU: CI runs it)

1. tests: the suite's CUDA-marked tests (`pytest -m cuda`; on a CPU they skip).
2. entry points: main_pretrain, main_linprobe and main_finetune for a few steps each, in
   bf16 and fp16, eager and --compile (--quick: --compile with bf16 only); main_pretrain
   also with --gpu_decode (on JPEGs written here). Each must exit 0 and write its checkpoint.
3. pretraining speed, per model at the published per-GPU batch (ViT-B/16 and ViT-L/16,
   batch 128, bf16; --quick: a tiny model): images/s eager and compiled, MFU = FLOPs of
   one training step (torch.utils.flop_counter) x steps/s / peak (a bf16 matmul measured
   on the same device), peak memory (torch.cuda.max_memory_allocated; on CPU the
   process's max RSS), and the regulariser's cost in % of the MAE step (U-MAE, M-MAE).
4. the largest per-GPU batch that fits for ViT-L/16 and ViT-H/14 (doubling, then bisection
   on out-of-memory; --quick: a tiny model up to a cap).
5. the targets, each PASS / FAIL / n.a.: ViT-B/16 bf16 MFU >= 50% on one H100, regulariser
   overhead <= 3% of the step, compile >= 1.2x over eager.
Exit status: 1 if a test or an entry point failed (the targets are reported, not enforced).
"""
import argparse
import datetime
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.dirname(os.path.abspath(__file__))):
    if p not in sys.path:
        sys.path.insert(0, p)

import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import models_mae  # noqa: E402
from pretrain_speed import METHODS, measure_peak_tflops, our_args, our_steps  # noqa: E402
from util.amp import grad_scaler  # noqa: E402
from util.optim import adamw  # noqa: E402

TARGETS = {"mfu": 0.50, "reg_overhead": 0.03, "compile_speedup": 1.2}


def get_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes (minutes on a CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--results_md", default=None,
                   help="append the report here (default on CUDA without --quick: benchmarks/RESULTS.md)")
    p.add_argument("--skip", default="", help="comma-separated parts to leave out: tests,entry,speed,batch")
    p.add_argument("--repeats", default=None, type=int, help="timed rounds (default 5, --quick 2)")
    return p.parse_args()


class Report:
    def __init__(self):
        self.lines, self.failed = [], False

    def __call__(self, line=""):
        print(line, flush=True)
        self.lines.append(line)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---- 1. tests --------------------------------------------------------------------------------
def run_tests(out):
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    ok = proc.returncode in (0, 5)  # 5: nothing collected/selected
    out(f"tests: `{' '.join(['python'] + cmd[1:])}`: {summary}" + ("" if ok else "  **FAILED**"))
    out.failed |= not ok


# ---- 2. entry points -----------------------------------------------------------------------------
def write_jpegs(root, classes=2, per_class=16, size=(80, 60)):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            os.makedirs(os.path.join(root, split, f"c{c}"), exist_ok=True)
            for i in range(per_class):
                small = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8))
                small.resize(size, Image.BICUBIC).save(os.path.join(root, split, f"c{c}", f"{i}.jpg"), quality=90)


def run_entry(out, name, script, args, ckpt):
    cmd = [sys.executable, script, *map(str, args)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    ok = proc.returncode == 0 and os.path.isfile(ckpt)
    last = [line for line in proc.stdout.splitlines() if "top-1" in line or "online probe" in line]
    detail = last[-1].split("] ", 1)[-1] if last else ""
    err = (proc.stderr.strip().splitlines() or [""])[-1]
    out(f"| {name} | {'ok' if ok else '**FAILED**'} | {time.time() - t0:.0f} s | {detail if ok else err[:160]} |")
    out.failed |= not ok
    return ok


def entry_points(out, device, work, quick):
    shape = ["--input_size", "32", "--patch_size", "4", "--depth", "2"]  # functional runs: small and quick
    common = ["--device", device.type, "--batch_size", "8", "--epochs", "1", "--warmup_epochs", "0",
              "--num_workers", "1", "--print_freq", "2", "--synthetic_size", "32", "--nb_classes", "10"]
    data = os.path.join(work, "jpegs")
    write_jpegs(data)
    out("| run | result | wall | last line |")
    out("| --- | --- | --- | --- |")
    pre = os.path.join(work, "pretrain_ref")
    ok = run_entry(out, "main_pretrain (fp32 reference for the evaluations)", "main_pretrain.py",
                   ["--model", "mae_vit_tiny_patch16", *shape, "--decoder_depth", "1", *common, "--amp", "none",
                    "--reg", "tcr",
                    "--lamb", "0.01", "--val_interval", "1", "--vis_every", "0", "--output_dir", pre],
                   os.path.join(pre, "checkpoint-0.pth"))
    for amp in ("bf16", "fp16"):
        for compile_ in (False, True) if amp == "bf16" or not quick else (False,):  # --quick: CPU compiles slowly
            tag = f"{amp}{' --compile' if compile_ else ''}"
            flags = ["--amp", amp] + (["--compile"] if compile_ else [])
            for decode in (False, True):
                o = os.path.join(work, f"pre_{amp}_{compile_}_{decode}")
                extra = ["--data_path", data, "--gpu_decode", "--nb_classes", "2"] if decode else []
                run_entry(out, f"main_pretrain {tag}{' --gpu_decode' if decode else ''}", "main_pretrain.py",
                          ["--model", "mae_vit_tiny_patch16", *shape, "--decoder_depth", "1", *common, *flags,
                           "--reg", "tcr",
                           "--lamb", "0.01", "--val_interval", "1", "--vis_every", "0", *extra,
                           "--output_dir", o], os.path.join(o, "checkpoint-0.pth"))
            if not ok:
                continue
            for script in ("main_linprobe.py", "main_finetune.py"):
                o = os.path.join(work, f"{script[5:-3]}_{amp}_{compile_}")
                run_entry(out, f"{script[:-3]} {tag}", script,
                          ["--model", "vit_tiny_patch16", *shape, *common, *flags, "--finetune",
                           os.path.join(pre, "checkpoint-0.pth"), "--output_dir", o],
                          os.path.join(o, "checkpoint-0.pth"))


# ---- 3. speed ----------------------------------------------------------------------------------------
def train_flops(model, args, samples, targets):
    """FLOPs of one training step (forward + backward), counted by torch."""
    from engine_pretrain import compute_losses
    counter = FlopCounterMode(display=False)
    with counter:
        loss, _, _ = compute_losses(model, samples, targets, args)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def peak_memory_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux: the whole process


def speed(out, device, name, size, batch, repeats, peak_tflops, steps=3):
    """img/s eager and compiled (bf16), MFU, peak memory, regulariser overhead."""
    kw = dict(img_size=size["input_size"], nb_classes=1000)
    kw.update({k: v for k, v in size.items() if k != "input_size"})
    torch.manual_seed(0)
    model = models_mae.MODELS[name](**kw).to(device)
    cli = argparse.Namespace(amp="bf16", mask_ratio=0.75, batch_size=batch, device=str(device))
    samples = torch.randn(batch, 3, size["input_size"], size["input_size"], device=device)
    targets = torch.randint(0, 1000, (batch,), device=device)
    scaler = grad_scaler(device, "bf16")
    results = {}
    for compiled in (False, True):
        fast = torch.compile(model) if compiled else model
        optimizer = adamw(model, our_args(cli, "mae"))
        times = {m: [] for m in METHODS}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for m in METHODS:  # warm-up (and compilation)
            our_steps(fast, optimizer, scaler, samples, targets, our_args(cli, m), 2)
        for r in range(repeats):
            order = list(METHODS) if r % 2 == 0 else list(METHODS)[::-1]
            for m in order:
                sync(device)
                t0 = time.perf_counter()
                our_steps(fast, optimizer, scaler, samples, targets, our_args(cli, m), steps)
                sync(device)
                times[m].append((time.perf_counter() - t0) / steps)
        results[compiled] = {m: statistics.median(v) for m, v in times.items()}
        results[compiled]["mem"] = peak_memory_mib(device)
    flops = train_flops(model, our_args(cli, "mae"), samples, targets)
    for compiled, r in results.items():
        img_s = batch / r["mae"]
        mfu = flops / r["mae"] / (peak_tflops * 1e12)
        over = {m: r[m] / r["mae"] - 1 for m in ("umae", "mmae")}
        out(f"| {name} {'compiled' if compiled else 'eager'} | {batch} | {img_s:,.0f} | {100 * mfu:.1f}% "
            f"| {r['mem']:,.0f} | {100 * over['umae']:+.1f}% / {100 * over['mmae']:+.1f}% |")
    speedup = results[False]["mae"] / results[True]["mae"]
    best = min(results, key=lambda c: results[c]["mae"])
    return {"mfu": flops / results[best]["mae"] / (peak_tflops * 1e12), "compile_speedup": speedup,
            "reg_overhead": max(results[best][m] / results[best]["mae"] - 1 for m in ("umae", "mmae")),
            "flops_per_image": flops / batch}


# ---- 4. largest batch ------------------------------------------------------------------------------------
def fits(device, name, batch, input_size):
    """One bf16 training step at this batch: True unless out of memory."""
    model = optimizer = samples = None
    try:
        torch.manual_seed(0)
        model = models_mae.MODELS[name](img_size=input_size).to(device)
        cli = argparse.Namespace(amp="bf16", mask_ratio=0.75, batch_size=batch, device=str(device))
        optimizer = adamw(model, our_args(cli, "mmae"))
        samples = torch.randn(batch, 3, input_size, input_size, device=device)
        targets = torch.randint(0, 1000, (batch,), device=device)
        our_steps(model, optimizer, grad_scaler(device, "bf16"), samples, targets, our_args(cli, "mmae"), 1)
        sync(device)
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        del model, optimizer, samples
        if device.type == "cuda":
            torch.cuda.empty_cache()


def largest_batch(device, name, input_size, cap):
    lo, hi = 0, 16
    while hi <= cap and fits(device, name, hi, input_size):
        lo, hi = hi, hi * 2
    if hi > cap:
        return lo, True
    while hi - lo > 8:  # bisection to a multiple of 8
        mid = (lo + hi) // 2 // 8 * 8
        lo, hi = (mid, hi) if fits(device, name, mid, input_size) else (lo, mid)
    return lo, False


# ---- report ------------------------------------------------------------------------------------------------
def environment(device):
    parts = [f"torch {torch.__version__}", f"torchvision {torchvision.__version__}", f"timm {timm.__version__}",
             f"python {platform.python_version()}"]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True)
        parts = [f"{props.name} ({props.total_memory / 2**30:.0f} GiB)",
                 f"driver {smi.stdout.strip() or 'unknown'}", f"CUDA {torch.version.cuda}",
                 f"cuDNN {torch.backends.cudnn.version()}"] + parts
    else:
        parts = [f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"] + parts
    return ", ".join(parts)


def main():
    cli = get_args()
    device = torch.device(cli.device)
    skip = set(filter(None, cli.skip.split(",")))
    repeats = cli.repeats or (2 if cli.quick else 5)
    out = Report()
    cmd = "python benchmarks/gpu_acceptance.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])
    out(f"### GPU acceptance, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
        f"{' (--quick)' if cli.quick else ''}")
    out()
    out(f"`{cmd}` on {environment(device)}")
    out()
    t_start = time.time()
    if "tests" not in skip:
        run_tests(out)
        out()
    if "entry" not in skip:
        with tempfile.TemporaryDirectory() as work:
            entry_points(out, device, work, cli.quick)
        out()
    measured = {}
    if "speed" not in skip:
        peak, kernels = measure_peak_tflops(device, torch.bfloat16, n=512 if cli.quick else None)
        out(f"peak: {peak:.3g} TFLOP/s, a bf16 matmul measured here "
            f"({', '.join(f'{k} {v:.3g}' for k, v in kernels.items())})")
        out()
        out("| model | batch | img/s (bf16) | MFU | peak memory MiB | U-MAE / M-MAE step cost over MAE |")
        out("| --- | --- | --- | --- | --- | --- |")
        models = ([("mae_vit_tiny_patch16", dict(input_size=32, patch_size=4, depth=2), 16)] if cli.quick else
                  [("mae_vit_base_patch16", dict(input_size=224), 128),
                   ("mae_vit_large_patch16", dict(input_size=224), 128)])
        for name, size, batch in models:
            measured[name] = speed(out, device, name, size, batch, repeats, peak)
        out()
    if "batch" not in skip:
        cases = ([("mae_vit_tiny_patch16", 32, 64)] if cli.quick else
                 [("mae_vit_large_patch16", 224, 4096), ("mae_vit_huge_patch14", 224, 4096)])
        for name, size, cap in cases:
            b, capped = largest_batch(device, name, size, cap)
            out(f"largest per-{device.type.upper()} batch, {name} at {size} px, bf16, M-MAE step: "
                f"{'>= ' if capped else ''}{b}{' (the cap)' if capped else ''}")
        out()
    if measured:
        key = "mae_vit_base_patch16" if "mae_vit_base_patch16" in measured else next(iter(measured))
        m = measured[key]
        on_h100 = device.type == "cuda" and "H100" in torch.cuda.get_device_name(device)
        checks = [("ViT-B/16 bf16 MFU >= 50% (one H100)", m["mfu"] >= TARGETS["mfu"], f"{100 * m['mfu']:.1f}%",
                   on_h100 and key == "mae_vit_base_patch16"),
                  ("regulariser overhead <= 3% of the step", m["reg_overhead"] <= TARGETS["reg_overhead"],
                   f"{100 * m['reg_overhead']:+.1f}%", not cli.quick),
                  ("compile >= 1.2x over eager", m["compile_speedup"] >= TARGETS["compile_speedup"],
                   f"{m['compile_speedup']:.2f}x", not cli.quick)]
        out(f"targets ({key}):")
        for label, ok, value, applies in checks:
            out(f"- {label}: {value} -> {('PASS' if ok else 'FAIL') if applies else 'n.a. (not the target setting)'}")
        out()
    out(f"acceptance {'FAILED' if out.failed else 'passed'} in {time.time() - t_start:.0f} s")
    path = cli.results_md or (os.path.join(ROOT, "benchmarks", "RESULTS.md")
                              if device.type == "cuda" and not cli.quick else None)
    if path:
        with open(path, "a") as f:
            f.write("\n" + "\n".join(out.lines) + "\n")
        print(f"appended to {path}")
    sys.exit(1 if out.failed else 0)


if __name__ == "__main__":
    main()
