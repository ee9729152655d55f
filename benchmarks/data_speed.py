"""Images/s per CPU core of the training input pipeline, on real ImageNet JPEGs.

    D=$(mktemp -d) && tar xf ../shared/data/imagenet-sample/images.tar -C "$D"
    python benchmarks/data_speed.py --data_path "$D/imagenet-sample" --input_size 224
    python benchmarks/data_speed.py --smoke      # CI: 8 small generated JPEGs, 1 round

Every path goes from a file's path to the collated batch the model receives (batches of
--batch_size), in one thread: one DataLoader worker on one core.
  pil        MAE's official pipeline: PIL decode (util.datasets.checked_loader), torchvision
             RandomResizedCrop(scale 0.2-1, bicubic), flip, ToTensor, Normalize; float32 batch
  ours       the default loader (util/jpeg.py DecodeCrop, then flip): libjpeg-turbo decode
             (simplejpeg) with the box drawn first, reduced DCT scale where the box allows,
             torch's vectorised uint8 bicubic resize of the box; uint8 batch, normalised on
             the device by util.datasets.NormalizeOnDevice (not counted: GPU work)
  decode     decode only, PIL (checked_loader): the official pipeline's decode, the ceiling
and, to show where the time goes: pil_uint8 (pil without ToTensor/Normalize), pil_draft
(PIL only: draft() DCT scaling + one PIL resize of the box), pil_torch (PIL decode + draft,
torch resize: ours without simplejpeg), tv (torchvision.io.decode_jpeg + torch resize),
decode_turbo / decode_tv (decode only, simplejpeg / torchvision.io), worker / tensor (the
--gpu_decode path: worker side only / whole path with decode_augment on --device; on CUDA
the GPU's rate plus one core's worker side).
Paths alternate within each round (the order reversed every other round); rates are
medians over rounds and ratios are medians of the per-round ratios. Then pil and ours
run in real DataLoaders with 1 and 2 workers (images/s divided by the workers). The last
line is the 1-worker DataLoader result. The load of the machine is printed with every
measurement: on a shared machine per-core rates drop, the same-run ratios much less.
The cores-per-GPU figures are ESTIMATES: one H100 at --mfu of --peak_tflops from the FLOPs
model of benchmarks/pretrain_speed.py; with --device cuda also at the peak measured there.
"""
import argparse
import datetime
import math
import os
import resource
import statistics
import sys
import tarfile
import tempfile
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.dirname(os.path.abspath(__file__))):
    if p not in sys.path:
        sys.path.insert(0, p)

import numpy as np  # noqa: E402
import PIL  # noqa: E402
try:  # optional (not on the GPU machine): without it, ours falls back as util/jpeg.py does
    import simplejpeg
except ImportError:
    simplejpeg = None
import torch  # noqa: E402
import torch.nn.functional as Fn  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset, default_collate  # noqa: E402
from torchvision import transforms  # noqa: E402
from torchvision.io import ImageReadMode, decode_jpeg  # noqa: E402
from torchvision.transforms import functional as F  # noqa: E402

import models_mae  # noqa: E402
from pretrain_speed import measure_peak_tflops, model_flops_per_image  # noqa: E402
from util.datasets import checked_loader, pretrain_transform  # noqa: E402
from util.gpu_aug import PlanCrop, decode_augment, read_encoded  # noqa: E402
from util.jpeg import DecodeCrop, dct_scale  # noqa: E402

warnings.filterwarnings("ignore", category=DeprecationWarning)  # torchvision.io's decoders
warnings.filterwarnings("ignore", message="The given buffer is not writable")

SHARED_TAR = os.path.join(ROOT, "..", "shared", "data", "imagenet-sample", "images.tar")


def load():
    with open("/proc/loadavg") as f:
        return "load " + " ".join(f.read().split()[:3])


# ---- the paths ------------------------------------------------------------------------
def pipelines(size, device):
    """name -> function(list of paths) -> the collated batch."""
    official = pretrain_transform(size)
    crop, flip = official.transforms[0], transforms.RandomHorizontalFlip()
    official_uint8 = transforms.Compose([crop, flip, transforms.PILToTensor()])
    ours = DecodeCrop(crop)

    def box_and_scale(img):
        top, left, h, w = crop.get_params(img, crop.scale, crop.ratio)
        s = dct_scale(h, w, size, size) if img.format == "JPEG" else 1
        if s > 1:
            img.draft(img.mode, (img.width // s, img.height // s))
        return (left, top, left + w, top + h), s

    def pil_draft(path):  # PIL only: DCT scaling, then one resize of the box (no full-image resize)
        with Image.open(path) as img:
            (l, t, r, b), s = box_and_scale(img)
            img = img.convert("RGB")
        out = img.resize((size, size), Image.BICUBIC, box=(l / s, t / s, r / s, b / s))
        return F.pil_to_tensor(flip(out))

    def torch_resize(x, box, s=1):  # x: (C, H, W) uint8 at 1/s; box in source pixels
        l, t, r, b = box
        x = x[None, :, t // s:math.ceil(b / s), l // s:math.ceil(r / s)]
        return flip(Fn.interpolate(x, size=(size, size), mode="bicubic", antialias=True)[0])

    def pil_torch(path):  # ours with PIL's decoder
        with Image.open(path) as img:
            box, s = box_and_scale(img)
            img = img.convert("RGB")
        return torch_resize(torch.from_numpy(np.array(img)).permute(2, 0, 1), box, s)

    def tv(path):  # torchvision.io's libjpeg-turbo decoder, no DCT scaling
        x = decode_jpeg(torchvision.io.read_file(path), mode=ImageReadMode.RGB)
        top, left, h, w = crop.get_params(x, crop.scale, crop.ratio)
        return torch_resize(x, (left, top, left + w, top + h))

    def decode_turbo(path):
        with open(path, "rb") as f:
            return torch.from_numpy(simplejpeg.decode_jpeg(f.read(), colorspace="RGB")[:1, :1])

    plan = PlanCrop()

    def gpu_decode_batch(paths):  # --gpu_decode: decode_augment on --device (the GPU in training)
        items = [plan(read_encoded(p)) for p in paths]
        out = decode_augment([d for d, _ in items], torch.stack([q for _, q in items]), size, device)
        if out.is_cuda:
            torch.cuda.synchronize()
        return out

    per_image = {
        "pil": lambda p: official(checked_loader(p)),
        "ours": lambda p: flip(ours(p)),
        "decode": lambda p: checked_loader(p).size,
        "pil_uint8": lambda p: official_uint8(checked_loader(p)),
        "pil_draft": pil_draft,
        "pil_torch": pil_torch,
        "tv": tv,
        **({"decode_turbo": decode_turbo} if simplejpeg else {}),
        "decode_tv": lambda p: decode_jpeg(torchvision.io.read_file(p), mode=ImageReadMode.RGB).shape,
        "worker": lambda p: plan(read_encoded(p))[1],
    }
    batched = {name: (lambda fn: lambda ps: default_collate([fn(p) for p in ps]))(fn)
               for name, fn in per_image.items()}
    batched["tensor"] = gpu_decode_batch
    return batched, per_image


def cpu_seconds(children=False):
    """CPU time used so far by this process, or by its finished (joined) child processes."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(run, n_images, workers=0):
    """{"cpu": images per CPU-second, "wall": images per second per core} of run(): CPU time of
    this process (workers=0) or of the DataLoader workers it started and joined. On a
    shared machine wall time includes waiting for a core; CPU time is what a core of
    one's own would take (both printed)."""
    wall, cpu = time.perf_counter(), cpu_seconds(workers > 0)
    run()
    cpu, wall = cpu_seconds(workers > 0) - cpu, time.perf_counter() - wall
    return {"cpu": n_images / cpu, "wall": n_images / wall / max(workers, 1)}


def in_process(paths, fns, rounds, batch_size):
    """Rates per path, per round; paths alternate within a round."""
    names = list(fns)
    rates = {n: [] for n in names}
    for n in names:  # warm-up: imports, plugin registration, first allocations
        fns[n](paths[:2])

    def epoch(fn):
        for i in range(0, len(paths), batch_size):
            fn(paths[i:i + batch_size])

    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            torch.manual_seed(r)
            rates[n].append(timed(lambda: epoch(fns[n]), len(paths)))
        print(f"  round {r + 1}/{rounds} done, {load()}", flush=True)
    return rates


class Files(Dataset):
    def __init__(self, paths, fn):
        self.paths, self.fn = paths, fn

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.fn(self.paths[i])


def with_loaders(paths, per_image, names, workers, rounds, batch_size):
    """Rates per core of real DataLoaders with k workers, started for each epoch (so that
    their CPU time can be read once they are joined); one warm-up epoch each."""
    rates = {}
    for k in workers:
        loaders = {n: DataLoader(Files(paths, per_image[n]), batch_size=batch_size, num_workers=k,
                                 generator=torch.Generator().manual_seed(0))
                   for n in names}

        def epoch(loader):
            for _ in loader:
                pass

        for n in names:
            epoch(loaders[n])
            rates[(n, k)] = []
        for r in range(rounds):
            for n in (names if r % 2 == 0 else names[::-1]):
                rates[(n, k)].append(timed(lambda: epoch(loaders[n]), len(paths), k))
        print(f"  {k} worker(s) done, {load()}", flush=True)
    return rates


# ---- data -----------------------------------------------------------------------------
def natural_like(rng, width, height):
    """A colour image with roughly photographic JPEG statistics (for --smoke only)."""
    img = np.full((height, width, 3), 127.5)
    for cells, amp in ((4, 0.9), (24, 0.35), (max(width // 4, 2), 0.4)):
        small = Image.fromarray(rng.integers(0, 255, (cells * height // width + 1, cells, 3), dtype=np.uint8))
        img += (np.asarray(small.resize((width, height), Image.BICUBIC), dtype=np.float32) - 127.5) * amp
    img += rng.normal(0, 10, size=img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def smoke_files(folder, n=8):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = os.path.join(folder, f"img_{i}.JPEG")
        img = natural_like(rng, 160, 120)
        (img.convert("L") if i == 0 else img).save(path, quality=90)
        paths.append(path)
    return paths


def image_files(root):
    found = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
             if f.lower().endswith((".jpeg", ".jpg", ".png"))]
    if not found:
        sys.exit(f"error: no .JPEG/.jpg/.png files under {root}")
    return sorted(found)


def describe(paths, size):
    sizes = [Image.open(p).size for p in paths]
    modes = [Image.open(p).mode for p in paths]
    mb = sum(os.path.getsize(p) for p in paths) / len(paths) / 1e3
    w, h = np.median([s[0] for s in sizes]), np.median([s[1] for s in sizes])
    torch.manual_seed(0)
    crop = transforms.RandomResizedCrop(size, scale=(0.2, 1.0))
    scales = [dct_scale(*crop.get_params(torch.empty(0, s[1], s[0]), crop.scale, crop.ratio)[2:], size, size)
              for s in sizes]
    return (f"{len(paths)} files, median {w:.0f}x{h:.0f}, mean {mb:.0f} KB, {modes.count('L')} grayscale, "
            f"{sum(m not in ('RGB', 'L') for m in modes)} other modes; output {size}px; crops decodable at "
            f"reduced DCT scale (box >= 2x output): {100 * sum(s > 1 for s in scales) / len(scales):.1f}%")


# ---- report -----------------------------------------------------------------------------
def gpu_estimates(cli):
    """ESTIMATED training images/s of one GPU: peak * mfu / (3 x forward FLOPs)."""
    out = {}
    for name in cli.models.split(","):
        with torch.device("meta"):  # shapes only, no memory
            model = models_mae.MODELS[name](img_size=cli.input_size)
        flops, _ = model_flops_per_image(model, 0.75)
        out[name] = (3 * flops, cli.peak_tflops * 1e12 * cli.mfu / (3 * flops))
    return out


def median(rates, key, clock="cpu"):
    return statistics.median(r[clock] for r in rates[key])


def ratio(rates, a, b, clock="cpu"):
    """Median over rounds of the per-round ratio a / b."""
    return statistics.median(x[clock] / y[clock] for x, y in zip(rates[a], rates[b]))


def rounds_text(rates, key, clock):
    return ", ".join(f"{r[clock]:.0f}" for r in rates[key])


def report(cli, rates, loader_rates):
    print(f"\nimages/s per core, median of {cli.rounds} rounds, by CPU time [by wall time]; "
          f"x pil = median per-round ratio")
    print("in one process, 1 thread:")
    for n in rates:
        unit = f"images/s on {cli.device}" if n == "tensor" and cli.device != "cpu" else "images/s per core"
        print(f"{n:12s} {unit} {median(rates, n):8.1f}  x pil {ratio(rates, n, 'pil'):5.2f}  "
              f"[{median(rates, n, 'wall'):6.1f}  x pil {ratio(rates, n, 'pil', 'wall'):5.2f}]  "
              f"(rounds: {rounds_text(rates, n, 'cpu')})")
    turbo = (f", {ratio(rates, 'ours', 'decode_turbo'):.2f} [{ratio(rates, 'ours', 'decode_turbo', 'wall'):.2f}] "
             "of simplejpeg's") if "decode_turbo" in rates else " (simplejpeg not installed)"
    print(f"ours / decode-only ceiling: {ratio(rates, 'ours', 'decode'):.2f} "
          f"[{ratio(rates, 'ours', 'decode', 'wall'):.2f}] of PIL's decode{turbo}")
    for (n, k) in loader_rates:
        line = (f"DataLoader {k} worker(s) {n:5s} images/s per core {median(loader_rates, (n, k)):8.1f}  "
                f"[{median(loader_rates, (n, k), 'wall'):6.1f}]  (rounds: {rounds_text(loader_rates, (n, k), 'cpu')})")
        if n == "ours" and ("pil", k) in loader_rates:
            line += (f"  ours / pil = {ratio(loader_rates, ('ours', k), ('pil', k)):.2f} "
                     f"[{ratio(loader_rates, ('ours', k), ('pil', k), 'wall'):.2f}]")
        print(line)
    final = loader_rates if ("ours", 1) in loader_rates else rates
    key = (lambda n: (n, 1)) if final is loader_rates else (lambda n: n)
    per_core = {n: median(final, key(n)) for n in ("ours", "pil")}
    projections(cli, per_core, median(rates, "worker"))
    print(f"per_core_img_s={per_core['ours']:.1f} official={per_core['pil']:.1f} "
          f"speedup={ratio(final, key('ours'), key('pil')):.2f}")


def measured_peak_line(cli):
    """(measured bf16 TFLOP/s or None, the line saying which peak the estimates use). The
    datasheet figure is above what a GPU reaches (an H200: about 770-800 of 989.5 on a
    large bf16 matmul), so on CUDA the estimates are also given at the measured peak."""
    if not cli.device.startswith("cuda"):
        return None, (f"peak: --peak_tflops {cli.peak_tflops:g} TFLOP/s (datasheet); not measured "
                      f"(--device {cli.device}: no GPU here)")
    measured, _ = measure_peak_tflops(torch.device(cli.device), torch.bfloat16)
    return measured, (f"peak: --peak_tflops {cli.peak_tflops:g} TFLOP/s (datasheet); measured "
                      f"{measured:.0f} TFLOP/s on {torch.cuda.get_device_name(cli.device)} (bf16 8192^3 matmul)")


def projections(cli, per_core, worker_rate):
    estimates = gpu_estimates(cli)
    measured, line = measured_peak_line(cli)
    print(line)
    for name, (flops, ips) in estimates.items():
        at_measured = "" if measured is None else (
            f"; at the measured peak {ips * measured / cli.peak_tflops:.0f} images/s, ours "
            f"{ips * measured / cli.peak_tflops / per_core['ours']:.1f} cores/GPU")
        print(f"{name}: {flops / 1e9:.1f} GFLOP per training image; ESTIMATE one GPU at "
              f"{100 * cli.mfu:.0f}% of {cli.peak_tflops:g} TFLOP/s = {ips:.0f} images/s -> "
              f"pil needs {ips / per_core['pil']:.1f} cores/GPU, ours {ips / per_core['ours']:.1f} "
              f"cores/GPU, --gpu_decode {ips / worker_rate:.1f} cores/GPU (worker side only){at_measured}")
    cores = cli.node_cores - cli.node_gpus  # one core per GPU for its training process
    for name, (_, ips) in estimates.items():
        need = cli.node_gpus * ips
        for n in ("pil", "ours"):
            feed = cores * per_core[n]
            print(f"ImageNet-1K epoch ({cli.epoch_images / 1e6:.2f}M images), {name}, {cli.node_gpus} GPUs + "
                  f"{cores} loader cores, {n}: loader {feed:.0f} images/s vs GPUs {need:.0f} -> "
                  f"{cli.epoch_images / min(feed, need) / 60:.1f} min per epoch, "
                  f"{'GPU-bound' if feed >= need else f'loader-bound (GPUs busy {100 * feed / need:.0f}%)'}")


def main(argv=None):
    p = argparse.ArgumentParser("input pipeline images/s per core")
    p.add_argument("--data_path", default=None,
                   help="folder of JPEGs (searched recursively); default: unpack " + SHARED_TAR)
    p.add_argument("--num_images", default=0, type=int, help="use the first N files (0 = all)")
    p.add_argument("--input_size", default=224, type=int)
    p.add_argument("--batch_size", default=64, type=int)
    p.add_argument("--rounds", default=5, type=int)
    p.add_argument("--workers", default="1,2", help="DataLoader worker counts ('' = skip)")
    p.add_argument("--models", default="mae_vit_base_patch16,mae_vit_large_patch16")
    p.add_argument("--peak_tflops", default=989.0, type=float, help="H100 SXM dense bf16")
    p.add_argument("--mfu", default=0.5, type=float)
    p.add_argument("--node_gpus", default=8, type=int)
    p.add_argument("--node_cores", default=96, type=int)
    p.add_argument("--epoch_images", default=1_281_167, type=int)
    p.add_argument("--device", default="cpu", help="where the tensor (--gpu_decode) path decodes")
    p.add_argument("--smoke", action="store_true", help="8 small generated files, 1 round, 64 px")
    cli = p.parse_args(argv)
    if cli.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no GPU is available")
    cli.workers = [int(k) for k in cli.workers.split(",") if k]
    torch.set_num_threads(1)  # one worker = one core
    with tempfile.TemporaryDirectory() as tmp:
        if cli.smoke:
            cli.rounds, cli.input_size, cli.batch_size, cli.workers = 1, 64, 4, [1]
            paths = smoke_files(tmp)
        else:
            if cli.data_path is None:
                if not os.path.isfile(SHARED_TAR):
                    sys.exit(f"error: no --data_path and no {SHARED_TAR}")
                with tarfile.open(SHARED_TAR) as tar:
                    tar.extractall(tmp, filter="data")
                cli.data_path = tmp
            paths = image_files(cli.data_path)
        paths = paths[:cli.num_images or None]
        print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, Pillow {PIL.__version__}, "
              f"simplejpeg {simplejpeg.__version__ if simplejpeg else 'not installed'}; {torch.backends.cpu.get_cpu_capability()}; "
              f"{os.cpu_count()} CPUs; {datetime.datetime.now().isoformat(timespec='seconds')}; {load()}")
        print(describe(paths, cli.input_size))
        print("not measured: pillow-simd (no wheel on PyPI, replaces Pillow); PyTurboJPEG (needs the "
              "system's libturbojpeg, and has no decode of a region: it would be simplejpeg's speed)")
        fns, per_image = pipelines(cli.input_size, cli.device)
        rates = in_process(paths, fns, cli.rounds, cli.batch_size)
        loader_rates = with_loaders(paths, per_image, ["pil", "ours"], cli.workers, cli.rounds, cli.batch_size)
    print(f"end: {load()}")
    report(cli, rates, loader_rates)
    return 0


if __name__ == "__main__":
    sys.exit(main())
