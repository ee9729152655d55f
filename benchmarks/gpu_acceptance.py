"""GPU acceptance: the one command to run on the day a GPU is there, sized to a short lease.

    python benchmarks/gpu_acceptance.py            # on CUDA: ~8 minutes from a cold start; the report
                                                   # is appended to benchmarks/RESULTS.md section by section
    python benchmarks/gpu_acceptance.py --quick    # the same sections at tiny shapes (CPU: CI runs it)
    python benchmarks/gpu_acceptance.py --batch_search   # also the largest-batch search, last

The plan (each section's estimated seconds and timeout) is printed first. Each section
runs in a subprocess of its own (its own process group, killed at its timeout) and its
lines are appended to the results file as soon as it ends, so a kill loses at most the
section in flight; a section that no longer fits the --budget_s is skipped with a line
saying so. In order, most important first:

1. peak: the device, its datasheet dense bf16 peak (DATASHEET_TFLOPS) and a bf16 matmul
   measured here.
2-3. speed_b, speed_l: ViT-B/16 and ViT-L/16 pretraining steps at the published per-GPU
   batch (128, bf16, eager, synthetic batch on the device): images/s, MFU = FLOPs of one
   training step (torch.utils.flop_counter) x steps/s over the datasheet peak and over
   the measured one, peak memory, and the U-MAE / M-MAE step's cost over MAE's.
   Timed rounds of --steps (>= 20) steps, medians over --repeats rounds.
4. pipeline: the real input pipeline on JPEGs written here (ImageNet-like sizes) with
   the DataLoader workers a run here would use (printed): the default loader
   (util/jpeg.py; PIL where simplejpeg is missing) and --gpu_decode (util/gpu_aug.py),
   alone and feeding ViT-B steps, next to the synthetic-batch figure; both timed as
   benchmarks/pipeline_rate.py does (one long-lived iterator over an endless sampler,
   warm-up untimed, >= 4 timed batches per worker).
5. tests: the suite's CUDA-marked tests (`pytest -m cuda`, the nvJPEG race test among them).
6. race: the race harness of tests/test_gpu_path.py on a plain decode_jpeg (which
   pytorch/vision PR 9606 says races) next to DeviceDecodeLoader's decode.
7. entry: main_pretrain (bf16, fp16 with --gpu_decode, bf16 --compile), main_linprobe,
   main_finetune, main_analyze for a few steps at small shapes: each must exit 0 and
   write its output.
8. compiled: ViT-B/16 under torch.compile (cold): compile time, images/s, speed-up.
9. batch (only with --batch_search): the largest per-GPU batch of ViT-L/16 (M-MAE step).
The targets, each PASS / FAIL / n.a., close the report: ViT-B/16 bf16 MFU >= 50% of the
datasheet peak on one H100/H200, regulariser overhead <= 3% of the step, compile >= 1.2x.
Exit status 1 if a section failed or timed out, or a test or entry point failed (the
targets are reported, not enforced).
"""
import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import resource
import shlex
import signal
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
import torch  # noqa: E402
from PIL import Image  # noqa: E402

TARGETS = {"mfu": 0.50, "reg_overhead": 0.03, "compile_speedup": 1.2}
# Dense bf16 tensor-core peaks (TFLOP/s) from NVIDIA's datasheets, which print them "with
# sparsity" (2:4): halved here. H100 datasheet (nvidia.com/en-us/data-center/h100): SXM
# 1,979, PCIe 1,513, NVL 1,671; H200 datasheet (nvidia.com/en-us/data-center/h200): SXM
# 1,979, NVL 1,671; A100 datasheet (nvidia.com/en-us/data-center/a100): 312 dense (624
# sparse) for SXM and PCIe. The first key found in torch.cuda.get_device_name() wins.
DATASHEET_TFLOPS = {"H200 NVL": 835.5, "H200": 989.5, "H100 PCIe": 756.5, "H100 NVL": 835.5, "H100": 989.5,
                    "A100": 312.0}

# name: (estimated seconds on one H100/H200, estimated seconds with --quick on 2 CPU cores)
# in the order they run: the order (numbers, CUDA tests, entry points, batch search),
# with the compiled step after the entry points since its cold compile is the least predictable
PLAN = {"peak": (15, 20), "speed_b": (35, 60), "speed_l": (45, 60), "pipeline": (60, 40), "tests": (60, 40),
        "race": (20, 10), "entry": (110, 150), "compiled": (120, 45), "batch": (120, 30),
        "train": (75, 150), "overhead": (25, 30), "compiled_l": (90, 45)}
OPTIONAL = {"batch", "train", "overhead", "compiled_l"}  # only in a --plan, or with --batch_search
# The two device commands (benchmarks/device_plan.sh N): (sections in order, budget s on CUDA,
# budget s with --quick on a CPU). The first answers what matters most within 240 s of the
# lease; the second adds the rest within 300 s, so that both fit a 15-minute lease with a
# 3-minute start-up and a margin (each wrapped in `timeout` by device_plan.sh).
PLANS = {"1": (["peak", "speed_b", "train", "race", "overhead"], 220, 600),
         "2": (["speed_l", "pipeline", "compiled", "compiled_l"], 280, 600)}


def get_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes (minutes on a CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--results_md", default=None,
                   help="append the report here (default on CUDA without --quick: benchmarks/RESULTS.md)")
    p.add_argument("--skip", default="", help="comma-separated sections to leave out: " + ",".join(PLAN))
    p.add_argument("--batch_search", action="store_true", help="also the largest-batch search (last)")
    p.add_argument("--plan", default=None, choices=sorted(PLANS),
                   help="one of the two device commands: its sections and budget (PLANS)")
    p.add_argument("--budget_s", default=None, type=float,
                   help="seconds for the whole run; sections that would not fit are skipped "
                        "(default 470 on CUDA, 900 with --quick)")
    p.add_argument("--steps", default=None, type=int, help="steps per timed round (default 20; --quick 4)")
    p.add_argument("--repeats", default=None, type=int, help="timed rounds (default 5, --quick 2)")
    p.add_argument("--workers", default=None, type=int,
                   help="DataLoader workers in the pipeline section (default: main_pretrain's, "
                        "util.cli.resolve_num_workers; --quick 2)")
    p.add_argument("--section", default=None, help=argparse.SUPPRESS)  # run one section (the driver's child)
    p.add_argument("--state", default=None, help=argparse.SUPPRESS)  # JSON the sections share
    p.add_argument("--deadline", default=None, type=float, help=argparse.SUPPRESS)
    return p.parse_args()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_command(cmd, timeout, env=None, cwd=ROOT):
    """(returncode or None on timeout, stdout, stderr) of cmd in its own process group,
    the whole group killed at the timeout (a pytest's or torchrun's children too)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=max(timeout, 1))
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return None, out, err


class Section:
    """What a section's child prints: markdown lines (stdout, which the driver appends to
    the results file), numbers for later sections (the shared state file), failures."""

    def __init__(self, cli):
        self.cli, self.device, self.quick = cli, torch.device(cli.device), cli.quick
        self.steps = cli.steps or (4 if cli.quick else 20)
        self.repeats = cli.repeats or (2 if cli.quick else 5)
        self.deadline = cli.deadline or time.time() + 600
        self.failed = False
        with open(cli.state) as f:
            self.state = json.load(f)

    def __call__(self, line=""):
        print(line, flush=True)

    def left(self):
        return self.deadline - time.time()

    def save(self, **numbers):
        with open(self.cli.state) as f:
            state = json.load(f)
        state.update(numbers)
        with open(self.cli.state, "w") as f:
            json.dump(state, f)


# ---- 1. peak ---------------------------------------------------------------------------------
def datasheet_tflops(device):
    if device.type != "cuda":
        return None, "no datasheet peak for a CPU"
    name = torch.cuda.get_device_name(device)
    for key, tflops in DATASHEET_TFLOPS.items():
        if key in name:
            return tflops, f"{key} datasheet, dense bf16"
    return None, f"no datasheet peak known for {name}"


def environment(device):
    import timm
    import torchvision
    try:
        import simplejpeg
        jpeg = f"simplejpeg {simplejpeg.__version__}"
    except ImportError:
        jpeg = "no simplejpeg (PIL fallback)"
    parts = [f"torch {torch.__version__}", f"torchvision {torchvision.__version__}", f"timm {timm.__version__}",
             f"python {platform.python_version()}", jpeg]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        parts = [f"{props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs)",
                 f"driver {smi.stdout.strip() or 'unknown'}", f"CUDA {torch.version.cuda}",
                 f"cuDNN {torch.backends.cudnn.version()}"] + parts
    else:
        parts = [f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"] + parts
    return ", ".join(parts)


def section_peak(out):
    from pretrain_speed import measure_peak_tflops
    out(f"on {environment(out.device)}")
    out()
    measured, kernels = measure_peak_tflops(out.device, torch.bfloat16, n=512 if out.quick else None)
    sheet, source = datasheet_tflops(out.device)
    out(f"peak bf16: datasheet {f'{sheet:g} TFLOP/s ({source})' if sheet else source}; measured "
        f"{measured:.3g} TFLOP/s ({', '.join(f'{k} {v:.3g}' for k, v in kernels.items())}, "
        f"{8192 if not out.quick else 512}^3 matmul)")
    out.save(peak_measured=measured, peak_datasheet=sheet)


# ---- 2-3. speed ----------------------------------------------------------------------------------
SPEED_MODELS = {"speed_b": ("mae_vit_base_patch16", dict(img_size=224), 128),
                "speed_l": ("mae_vit_large_patch16", dict(img_size=224), 128)}
QUICK_MODELS = {"speed_b": ("mae_vit_tiny_patch16", dict(img_size=32, patch_size=4, depth=2), 16),
                "speed_l": ("mae_vit_tiny_patch16", dict(img_size=32, patch_size=4, depth=3), 16)}


def train_flops(model, args, samples, targets):
    """FLOPs of one training step (forward + backward), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode
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


def setup(out, name, kw, batch):
    import models_mae
    from pretrain_speed import our_args
    from util.amp import grad_scaler
    from util.optim import adamw
    torch.manual_seed(0)
    model = models_mae.MODELS[name](nb_classes=1000, **kw).to(out.device)
    cli = argparse.Namespace(amp="bf16", mask_ratio=0.75, batch_size=batch, device=str(out.device))
    size = kw["img_size"]
    samples = torch.randn(batch, 3, size, size, device=out.device)
    targets = torch.randint(0, 1000, (batch,), device=out.device)
    return model, cli, samples, targets, adamw(model, our_args(cli, "mae")), grad_scaler(out.device, "bf16")


def time_methods(out, model, cli, samples, targets, optimizer, scaler, methods):
    """Median seconds per step of each method over out.repeats rounds of out.steps steps,
    the methods' order alternating between rounds."""
    from pretrain_speed import our_args, our_steps
    for m in methods:  # warm-up (and compilation)
        our_steps(model, optimizer, scaler, samples, targets, our_args(cli, m), 3)
    sync(out.device)
    times = {m: [] for m in methods}
    for r in range(out.repeats):
        for m in (methods if r % 2 == 0 else methods[::-1]):
            sync(out.device)
            t0 = time.perf_counter()
            our_steps(model, optimizer, scaler, samples, targets, our_args(cli, m), out.steps)
            sync(out.device)
            times[m].append((time.perf_counter() - t0) / out.steps)
    return {m: statistics.median(v) for m, v in times.items()}


def mfu_text(flops, step_s, state):
    parts = []
    for key, label in (("peak_datasheet", "datasheet"), ("peak_measured", "measured")):
        if state.get(key):
            parts.append(f"{100 * flops / step_s / (state[key] * 1e12):.1f}% of {label}")
    return " / ".join(parts) or "n.a."


def section_speed(out, which):
    from pretrain_speed import our_args
    name, kw, batch = (QUICK_MODELS if out.quick else SPEED_MODELS)[which]
    model, cli, samples, targets, optimizer, scaler = setup(out, name, kw, batch)
    if out.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(out.device)
    t = time_methods(out, model, cli, samples, targets, optimizer, scaler, ["mae", "umae", "mmae"])
    mem = peak_memory_mib(out.device)
    flops = train_flops(model, our_args(cli, "mae"), samples, targets)
    over = {m: t[m] / t["mae"] - 1 for m in ("umae", "mmae")}
    label = f"{name} depth {kw['depth']}" if out.quick else name
    out(f"| {label} eager | {batch} | {batch / t['mae']:,.0f} | {mfu_text(flops, t['mae'], out.state)} "
        f"| {mem:,.0f} | {100 * over['umae']:+.1f}% / {100 * over['mmae']:+.1f}% | {flops / batch / 1e9:.1f} |")
    out.save(**{which: {"model": name, "img_s": batch / t["mae"], "step_s": t["mae"], "flops": flops,
                        "reg_overhead": max(over.values()), "batch": batch}})


SPEED_HEADER = ["| model | batch | img/s (bf16, synthetic batch) | MFU | peak memory MiB "
                "| U-MAE / M-MAE step cost over MAE | train GFLOP/image |",
                "| --- | --- | --- | --- | --- | --- | --- |"]


def section_compiled(out, which="speed_b"):
    name, kw, batch = (QUICK_MODELS if out.quick else SPEED_MODELS)[which]
    model, cli, samples, targets, optimizer, scaler = setup(out, name, kw, batch)
    # --quick on a CPU: aot_eager (dynamo + AOT autograd, no code generation: seconds, not
    # minutes on 2 cores); the entry section's main_pretrain --compile runs inductor there
    backend = "aot_eager" if out.quick and out.device.type == "cpu" else "inductor"
    compiled = torch.compile(model, backend=backend)
    t0 = time.time()
    from pretrain_speed import our_args, our_steps
    our_steps(compiled, optimizer, scaler, samples, targets, our_args(cli, "mae"), 1)
    sync(out.device)
    compile_s = time.time() - t0
    t = time_methods(out, compiled, cli, samples, targets, optimizer, scaler, ["mae"])["mae"]
    eager = out.state.get(which)
    flops = eager["flops"] if eager else train_flops(model, our_args(cli, "mae"), samples, targets)
    speedup = eager["step_s"] / t if eager else None
    out(f"{name} torch.compile ({backend}, cold): first step {compile_s:.0f} s; {batch / t:,.0f} img/s, "
        f"MFU {mfu_text(flops, t, out.state)}; "
        f"{f'{speedup:.2f}x' if speedup else 'n.a. (no eager figure)'} over eager")
    out.save(**{"compiled" if which == "speed_b" else "compiled_l": {"img_s": batch / t, "step_s": t,
                                                                     "speedup": speedup}})


# ---- 4. pipeline ---------------------------------------------------------------------------------
def write_jpeg(job):
    path, (w, h), seed = job
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 127.5)
    for cells, amp in ((3, 0.8), (12, 0.4), (48, 0.25)):
        small = Image.fromarray(rng.integers(0, 255, (cells, cells, 3), dtype=np.uint8))
        img += (np.asarray(small.resize((w, h), Image.BICUBIC), dtype=float) - 127.5) * amp
    img += rng.normal(0, 4, img.shape)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)


def write_jpegs(root, n, sizes, workers, classes=4):
    """n photo-like JPEGs of the given (width, height)s in root/{train,val}/c*, in parallel."""
    import multiprocessing
    jobs = []
    for split, count in (("train", n), ("val", max(classes, n // 16))):
        for i in range(count):
            d = os.path.join(root, split, f"c{i % classes}")
            os.makedirs(d, exist_ok=True)
            jobs.append((os.path.join(d, f"{i}.jpg"), sizes[i % len(sizes)], i))
    with multiprocessing.get_context("fork").Pool(max(workers, 1)) as pool:
        pool.map(write_jpeg, jobs, chunksize=16)


def section_pipeline(out):
    """Both loaders timed the same way (benchmarks/pipeline_rate.py): one long-lived
    iterator over an endless sampler, warm-up untimed, >= 4 timed batches per worker, the
    --num_workers a run on this machine would use."""
    import main_pretrain
    from pipeline_rate import Take, close, endless, loader_rate
    from pretrain_speed import our_args
    from engine_pretrain import train_one_epoch
    from util.checkpoint import CheckpointSaver, RunState
    from util.cli import resolve_num_workers
    name, kw, batch = (QUICK_MODELS if out.quick else SPEED_MODELS)["speed_b"]
    size = kw["img_size"]
    base = main_pretrain.get_args_parser().parse_args(["--num_workers", str(out.cli.workers)] if out.cli.workers
                                                      else ["--num_workers", "2"] if out.quick else [])
    how = resolve_num_workers(base)
    workers = base.num_workers
    n = 64 if out.quick else max(1024, 2 * workers * batch)  # each worker's batches distinct files
    sizes = [(120, 90), (90, 120)] if out.quick else [(500, 375), (375, 500), (500, 333), (640, 480)]
    with tempfile.TemporaryDirectory() as data:
        t0 = time.time()
        write_jpegs(data, n, sizes, workers)
        out(f"{n} photo-like JPEGs ({', '.join(f'{w}x{h}' for w, h in sizes)}, quality 90) written in "
            f"{time.time() - t0:.0f} s; batch {batch}; {how}; one long-lived iterator per loader over an "
            "endless sampler, warm-up untimed:")
        out()
        out("| input | loader alone img/s | feeding " + name + " (bf16 MAE steps) img/s | timed batches |")
        out("| --- | --- | --- | --- |")
        synthetic = out.state.get("speed_b", {}).get("img_s")
        out(f"| synthetic batch on the device (speed_b) | - | {f'{synthetic:,.0f}' if synthetic else 'n.a.'} | - |")
        model, cli, _, _, optimizer, scaler = setup(out, name, kw, batch)
        a = our_args(cli, "mae")

        def run_steps(loader):
            run = RunState()
            saver = CheckpointSaver(a, model, optimizer, scaler, run, out.device)
            with contextlib.redirect_stdout(io.StringIO()):
                train_one_epoch(model, model, loader, optimizer, scaler, out.device, 0, run, saver, a)
            sync(out.device)

        for label, gpu_decode in (("default loader (util/jpeg.py)", False), ("--gpu_decode (util/gpu_aug.py)", True)):
            argv = ["--data_path", data, "--batch_size", str(batch), "--num_workers", str(workers),
                    "--input_size", str(size), "--device", out.device.type, "--model", name]
            argv += [f"--{k}={v}" for k, v in kw.items() if k != "img_size"]  # the loader's mask noise fits the model
            argv += ["--gpu_decode"] if gpu_decode else []
            args = main_pretrain.get_args_parser().parse_args(argv)
            from util.cli import check_common_args
            check_common_args(args)
            it = iter(endless(main_pretrain.build_train_loader(args, out.device)))
            alone, shape, steps = loader_rate(it, batch, workers, out.device, steps=max(out.steps, 4 * workers))
            assert shape == (batch, 3, size, size), shape
            run_steps(Take(it, 3))  # the step's own warm-up, untimed
            t0 = time.perf_counter()
            run_steps(Take(it, steps))
            fed = steps * batch / (time.perf_counter() - t0)
            close(it)
            out(f"| {label} | {alone:,.0f} | {fed:,.0f} | {steps} |")


# ---- 6. tests, 7. race -------------------------------------------------------------------------
def section_tests(out):
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"]
    rc, stdout, stderr = run_command(cmd, out.left() - 5)
    summary = (stdout.strip().splitlines() or ["(no output)"])[-1]
    ok = rc in (0, 5)  # 5: nothing collected/selected
    out(f"tests: `python -m pytest -q -m cuda tests`: {summary}" + ("" if ok else "  **FAILED**"))
    if not ok:
        out.failed = True
        for line in [ln for ln in stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))][:10]:
            out(f"- {line}")


def section_race(out):
    if out.device.type != "cuda":
        out("decode race: n.a. on a CPU (no nvJPEG stream)")
        return
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from test_gpu_path import NoSampler, decode_race, race_inputs
    from torchvision.io import ImageReadMode, decode_jpeg
    from util.gpu_aug import DeviceDecodeLoader
    with tempfile.TemporaryDirectory() as tmp:
        import pathlib
        data_, params, nbytes = race_inputs(pathlib.Path(tmp))
    loader = DeviceDecodeLoader(NoSampler(), 224, out.device)
    paths = {"decode_jpeg(device='cuda') on the current stream":
             lambda: decode_jpeg([data_], mode=ImageReadMode.RGB, device=out.device)[0],
             "DeviceDecodeLoader (side stream, synchronize, event, record_stream)":
             lambda: loader.hand_over(loader.start(([data_], params, torch.tensor([0]))))[0]}
    rounds = 20
    for label, decode in paths.items():
        corrupted, wrong = decode_race(decode, nbytes, rounds=rounds)
        out(f"- decode race, {label}: {corrupted}/{rounds} rounds corrupted queued reads, "
            f"{wrong}/{rounds} results differ from a decode run alone")


# ---- the first device command's checks: training on the device, the decode's cost ---------------
def pretrain_run(out, name, args, outdir, torchrun=False):
    """main_pretrain with args into outdir (a row of the table); True if it exited 0 and
    wrote checkpoint-0.pth."""
    launch = ["-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
              "--master_port", str(29400 + os.getpid() % 500)] if torchrun else []
    script = os.path.join(ROOT, "main_pretrain.py")
    t0 = time.time()
    rc, stdout, stderr = run_command([sys.executable, *launch, script, *map(str, args), "--output_dir", outdir],
                                     out.left() - 5, env={"PYTHONWARNINGS": "ignore"})
    ok = rc == 0 and os.path.isfile(os.path.join(outdir, "checkpoint-0.pth"))
    err = "timed out" if rc is None else (stderr.strip().splitlines() or [""])[-1]
    out(f"| {name} | {'ok' if ok else '**FAILED**'} | {time.time() - t0:.0f} s | {'' if ok else err[:160]} |")
    out.failed |= not ok
    return ok, stdout


def section_train(out):
    """main_pretrain on the device: bf16 and fp16 (--gpu_decode, the decode thread), under
    torchrun with one process (the NCCL process group; DDP itself wraps from 2 processes),
    and a run stopped after epoch 0 and relaunched against the run in one go."""
    import shutil
    tiny = ["--model", "mae_vit_tiny_patch16", "--input_size", "32", "--patch_size", "4", "--depth", "2",
            "--decoder_depth", "1", "--device", out.device.type, "--batch_size", "16", "--warmup_epochs", "0",
            "--num_workers", "2", "--print_freq", "2", "--synthetic_size", "64", "--nb_classes", "10",
            "--val_interval", "0", "--vis_every", "0", "--reg", "tcr", "--lamb", "0.01"]
    with tempfile.TemporaryDirectory() as work:
        data = os.path.join(work, "jpegs")
        write_jpegs(data, 64, [(80, 60), (60, 80)], 2, classes=2)
        out("| run | result | wall | error |")
        out("| --- | --- | --- | --- |")
        two = [*tiny, "--amp", "bf16", "--epochs", "2", "--save_every", "1"]
        full, cut = os.path.join(work, "full"), os.path.join(work, "cut")
        pretrain_run(out, "bf16, 2 epochs", two, full)
        pretrain_run(out, "fp16 --gpu_decode (JPEGs)", [*tiny, "--amp", "fp16", "--epochs", "1", "--data_path", data,
                                                         "--gpu_decode", "--nb_classes", "2"], os.path.join(work, "fp16"))
        pretrain_run(out, "bf16 under torchrun, 1 process", [*tiny, "--amp", "bf16", "--epochs", "1"],
                     os.path.join(work, "torchrun"), torchrun=True)
        if not os.path.isfile(os.path.join(full, "checkpoint-0.pth")):
            out("exact resume: n.a. (the 2-epoch run wrote no checkpoint-0.pth)")
            return
        os.makedirs(cut)
        shutil.copy(os.path.join(full, "checkpoint-0.pth"), cut)
        ok, stdout = pretrain_run(out, "bf16, stopped after epoch 0 and relaunched", two, cut)
        if ok and os.path.isfile(os.path.join(cut, "checkpoint-1.pth")):
            a, b = (torch.load(os.path.join(d, "checkpoint-1.pth"), weights_only=True, map_location="cpu")["model"]
                    for d in (full, cut))
            diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
            same = all(torch.equal(a[k], b[k]) for k in a)
            out(f"exact resume: {'bitwise equal' if same else f'**not bitwise equal** (max weight difference {diff:.2e})'}"
                f" to the run in one go after epoch 1; {'resumed' if 'resumed from' in stdout else '**no resume line**'}")
            out.failed |= not same and diff > 1e-4


def section_overhead(out):
    """ViT-B steps fed by a synthetic batch on the device against steps fed by
    DeviceDecodeLoader (decode thread, side stream) over JPEG batches already in memory:
    the decode's cost to the step, without DataLoader workers. Timed as pipeline_rate
    does (one long-lived iterator, warm-up untimed)."""
    import itertools
    from pipeline_rate import Take
    from pretrain_speed import our_args
    from engine_pretrain import train_one_epoch
    from util.checkpoint import CheckpointSaver, RunState
    from util.gpu_aug import DeviceDecodeLoader, PlanCrop, collate_encoded, read_encoded
    name, kw, batch = (QUICK_MODELS if out.quick else SPEED_MODELS)["speed_b"]
    sizes = [(120, 90), (90, 120)] if out.quick else [(500, 375), (375, 500), (500, 333), (640, 480), (333, 500)]
    with tempfile.TemporaryDirectory() as data:
        write_jpegs(data, 2 * batch, sizes, os.cpu_count() or 1)
        paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(data, "train")) for f in fs)
        torch.manual_seed(0)
        items = [(PlanCrop()(read_encoded(p)), 0) for p in paths]
    batches = [collate_encoded(items[i:i + batch]) for i in range(0, len(items) - batch + 1, batch)]
    model, cli, samples, targets, optimizer, scaler = setup(out, name, kw, batch)
    a = our_args(cli, "mae")

    class Cycle:
        sampler = None

        def __iter__(self):
            return itertools.cycle(batches)

    feeds = {"synthetic batch on the device": itertools.repeat((samples, targets)),
             "--gpu_decode of in-memory JPEGs (decode thread)": iter(DeviceDecodeLoader(Cycle(), kw["img_size"], out.device))}
    times = {}
    for label, it in feeds.items():
        for n in (3, out.steps):  # warm-up, then timed
            run, t0 = RunState(), time.perf_counter()
            saver = CheckpointSaver(a, model, optimizer, scaler, run, out.device)
            with contextlib.redirect_stdout(io.StringIO()):
                train_one_epoch(model, model, Take(it, n), optimizer, scaler, out.device, 0, run, saver, a)
            sync(out.device)
        times[label] = (time.perf_counter() - t0) / out.steps
        out(f"- {name} fed by the {label}: {batch / times[label]:,.0f} img/s ({out.steps} steps)")
    slow, fast = times[list(feeds)[1]], times[list(feeds)[0]]
    out(f"- --gpu_decode's cost to the step: {100 * (slow / fast - 1):+.1f}% "
        f"({len(sizes)} image sizes per batch, batch {batch})")
    out.save(overhead={"decode_overhead": slow / fast - 1})
    feeds[list(feeds)[1]].close()


# ---- 8. entry points ------------------------------------------------------------------------------
def run_entry(out, name, script, args, produced, timeout):
    cmd = [sys.executable, script, *map(str, args)]
    t0 = time.time()
    rc, stdout, stderr = run_command(cmd, timeout, env={"PYTHONWARNINGS": "ignore"})
    ok = rc == 0 and os.path.isfile(produced)
    last = [line for line in stdout.splitlines() if "top-1" in line or "online probe" in line]
    detail = last[-1].split("] ", 1)[-1] if last else ""
    err = "timed out" if rc is None else (stderr.strip().splitlines() or [""])[-1]
    out(f"| {name} | {'ok' if ok else '**FAILED**'} | {time.time() - t0:.0f} s | {detail if ok else err[:160]} |")
    out.failed |= not ok
    return ok


def section_entry(out):
    device = out.device
    shape = ["--input_size", "32", "--patch_size", "4", "--depth", "2"]  # functional runs: small and quick
    common = ["--device", device.type, "--batch_size", "8", "--epochs", "1", "--warmup_epochs", "0",
              "--num_workers", "1", "--print_freq", "2", "--synthetic_size", "32", "--nb_classes", "10"]
    pre_flags = ["--model", "mae_vit_tiny_patch16", *shape, "--decoder_depth", "1", "--reg", "tcr",
                 "--lamb", "0.01", "--val_interval", "1", "--vis_every", "0"]
    with tempfile.TemporaryDirectory() as work:
        data = os.path.join(work, "jpegs")
        write_jpegs(data, 32, [(80, 60)], 2, classes=2)
        out("| run | result | wall | last line |")
        out("| --- | --- | --- | --- |")
        pre = os.path.join(work, "pretrain_bf16")
        runs = [("main_pretrain bf16", "main_pretrain.py", [*pre_flags, *common, "--amp", "bf16"], pre),
                ("main_pretrain fp16 --gpu_decode (JPEGs)", "main_pretrain.py",
                 [*pre_flags, *common, "--amp", "fp16", "--data_path", data, "--gpu_decode", "--nb_classes", "2"],
                 os.path.join(work, "pretrain_fp16_gpu_decode")),
                ("main_pretrain bf16 --compile", "main_pretrain.py", [*pre_flags, *common, "--amp", "bf16", "--compile"],
                 os.path.join(work, "pretrain_compile"))]
        for name, script, args, o in runs:
            run_entry(out, name, script, [*args, "--output_dir", o], os.path.join(o, "checkpoint-0.pth"),
                      out.left() - 5)
        ckpt = os.path.join(pre, "checkpoint-0.pth")
        if not os.path.isfile(ckpt):
            out("evaluations skipped: the bf16 pretraining wrote no checkpoint")
            return
        for script in ("main_linprobe.py", "main_finetune.py"):
            o = os.path.join(work, script[5:-3])
            run_entry(out, f"{script[:-3]} bf16", script,
                      ["--model", "vit_tiny_patch16", *shape, *common, "--amp", "bf16", "--finetune", ckpt,
                       "--output_dir", o], os.path.join(o, "checkpoint-0.pth"), out.left() - 5)
        res = os.path.join(work, "analyze.json")
        run_entry(out, "main_analyze bf16", "main_analyze.py",
                  ["--checkpoint", ckpt, "--device", device.type, "--batch_size", "16", "--num_workers", "1",
                   "--synthetic_size", "32", "--nb_classes", "10", "--amp", "bf16", "--out_json", res], res,
                  out.left() - 5)


# ---- 9. largest batch --------------------------------------------------------------------------
def fits(out, name, batch, kw):
    """One bf16 M-MAE training step at this batch: True unless out of memory."""
    from pretrain_speed import our_args, our_steps
    model = optimizer = samples = None
    try:
        model, cli, samples, targets, optimizer, scaler = setup(out, name, kw, batch)
        our_steps(model, optimizer, scaler, samples, targets, our_args(cli, "mmae"), 1)
        sync(out.device)
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        del model, optimizer, samples
        if out.device.type == "cuda":
            torch.cuda.empty_cache()


def section_batch(out):
    name, kw, cap = (("mae_vit_tiny_patch16", dict(img_size=32, patch_size=4, depth=2), 64) if out.quick else
                     ("mae_vit_large_patch16", dict(img_size=224), 4096))
    lo, hi = 0, 64
    while hi <= cap and out.left() > 30 and fits(out, name, hi, kw):
        lo, hi = hi, hi * 2
    capped = hi > cap
    while not capped and hi - lo > 32 and out.left() > 30:  # bisection to a multiple of 32
        mid = (lo + hi) // 2 // 32 * 32
        lo, hi = (mid, hi) if fits(out, name, mid, kw) else (lo, mid)
    out(f"largest per-{out.device.type.upper()} batch, {name} at {kw['img_size']} px, bf16, M-MAE step: "
        f"{'>= ' if capped else ''}{lo}{' (the cap)' if capped else f' (out of memory at {hi})'}")


SECTIONS = {"peak": section_peak, "speed_b": lambda out: section_speed(out, "speed_b"),
            "speed_l": lambda out: section_speed(out, "speed_l"), "pipeline": section_pipeline,
            "compiled": section_compiled, "tests": section_tests, "race": section_race, "entry": section_entry,
            "batch": section_batch, "train": section_train, "overhead": section_overhead,
            "compiled_l": lambda out: section_compiled(out, "speed_l")}


def run_section(cli):
    """The child: one section; exit 1 if it reported a failure."""
    out = Section(cli)
    # TF32 left at the shipped default (off, main_pretrain --tf32): bf16 steps do not use it
    SECTIONS[cli.section](out)
    sys.exit(1 if out.failed else 0)


# ---- the driver -----------------------------------------------------------------------------------
def targets(state, on_datasheet_gpu, quick):
    b = state.get("speed_b")
    if not b:
        return ["targets: n.a. (no ViT-B figure)"]
    lines = [f"targets ({b['model']}):"]
    sheet = state.get("peak_datasheet")
    mfu = b["flops"] / b["step_s"] / (sheet * 1e12) if sheet else None
    best = min(b["step_s"], state.get("compiled", {}).get("step_s") or b["step_s"])
    mfu_best = b["flops"] / best / (sheet * 1e12) if sheet else None
    speedup = state.get("compiled", {}).get("speedup")
    checks = [("ViT-B/16 bf16 MFU >= 50% of the datasheet peak (eager / best of eager, compiled)",
               mfu_best, mfu_best is not None and mfu_best >= TARGETS["mfu"],
               f"{100 * mfu:.1f}% / {100 * mfu_best:.1f}%" if mfu else "n.a.", on_datasheet_gpu and not quick),
              ("regulariser overhead <= 3% of the step (eager)", b["reg_overhead"],
               b["reg_overhead"] <= TARGETS["reg_overhead"], f"{100 * b['reg_overhead']:+.1f}%", not quick),
              ("compile >= 1.2x over eager", speedup, speedup is not None and speedup >= TARGETS["compile_speedup"],
               f"{speedup:.2f}x" if speedup else "n.a.", not quick and speedup is not None)]
    for label, _, ok, value, applies in checks:
        lines.append(f"- {label}: {value} -> {('PASS' if ok else 'FAIL') if applies else 'n.a. (not the target setting)'}")
    return lines


def main():
    cli = get_args()
    if cli.section:
        return run_section(cli)
    device = torch.device(cli.device)
    quick = cli.quick
    skip = set(filter(None, cli.skip.split(",")))
    if cli.plan:
        names, cuda_budget, quick_budget = PLANS[cli.plan]
        names = [n for n in names if n not in skip]
        budget = cli.budget_s or (quick_budget if quick else cuda_budget)
    else:
        budget = cli.budget_s or (900 if quick else 470)
        names = [n for n in PLAN if n not in skip and (n not in OPTIONAL or (cli.batch_search and n == "batch"))]
    path = cli.results_md or (os.path.join(ROOT, "benchmarks", "RESULTS.md")
                              if device.type == "cuda" and not quick else None)
    results = open(path, "a") if path else None

    def out(line=""):
        print(line, flush=True)
        if results:
            results.write(line + "\n")
            results.flush()
            os.fsync(results.fileno())

    cmd = "python benchmarks/gpu_acceptance.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])
    out()
    out(f"### GPU acceptance, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
        f"{' (--quick)' if quick else ''}")
    out()
    out(f"`{cmd}`; budget {budget:.0f} s. Plan (estimated s / timeout s): " + ", ".join(
        f"{n} {PLAN[n][quick]} / {timeouts(PLAN[n][quick], quick)}" for n in names)
        + f"; {sum(PLAN[n][quick] for n in names)} s in all")
    if "peak" not in names:  # the peak section says it otherwise
        try:
            out(f"on {environment(device)}")
        except Exception as e:  # noqa: BLE001 - the sections run anyway
            out(f"environment not read: {e}")
    out()
    t_start = time.time()
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        state = os.path.join(tmp, "state.json")
        with open(state, "w") as f:
            json.dump({}, f)
        for i, name in enumerate(names):
            left = budget - (time.time() - t_start)
            est = PLAN[name][quick]
            if left < est:
                out(f"**{name}: skipped**, {left:.0f} s of the budget left, the section needs ~{est} s")
                out()
                continue
            timeout = min(timeouts(est, quick), left)
            if name == "speed_b" or (name == "speed_l" and "speed_b" not in names):
                for line in SPEED_HEADER:
                    out(line)
            child = [sys.executable, os.path.abspath(__file__), "--section", name, "--state", state,
                     "--device", cli.device, "--deadline", str(time.time() + timeout)]
            child += (["--quick"] if quick else []) + [f"--{k}={v}" for k in ("steps", "repeats", "workers")
                                                       if (v := getattr(cli, k)) is not None]
            t0 = time.time()
            rc, stdout, stderr = run_command(child, timeout + 10)
            for line in stdout.rstrip("\n").splitlines():
                out(line)
            took = time.time() - t0
            if rc != 0:
                failed = True
                why = f"timed out after {took:.0f} s" if rc is None else f"failed (exit {rc})"
                out(f"**{name}: {why}**" + "".join(f"\n    {ln}" for ln in stderr.strip().splitlines()[-6:]))
            print(f"[{name}: {took:.0f} s, estimated {est} s]", flush=True)
            next_is_speed_l = name == "speed_b" and i + 1 < len(names) and names[i + 1] == "speed_l"
            if not next_is_speed_l:
                out()
        with open(state) as f:
            numbers = json.load(f)
    on_datasheet_gpu = device.type == "cuda" and any(k in torch.cuda.get_device_name(device) for k in ("H100", "H200"))
    for line in targets(numbers, on_datasheet_gpu, quick):
        out(line)
    out()
    out(f"acceptance {'FAILED' if failed else 'passed'} in {time.time() - t_start:.0f} s")
    if results:
        results.close()
        print(f"appended to {path}")
    sys.exit(1 if failed else 0)


def timeouts(est, quick=False):
    """A section's timeout: twice its estimate, at least 60 s more than it. With --quick
    (a dry run on a shared CPU, where other jobs' load slowed sections 5-9x) four times,
    at least 120 s more: the dry run checks that every section runs, not how fast."""
    return max(4 * est, est + 120) if quick else max(2 * est, est + 60)


if __name__ == "__main__":
    main()
