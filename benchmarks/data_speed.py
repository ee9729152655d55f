"""Images/s per CPU core of the pretraining input pipeline, and cores needed per GPU.

    python benchmarks/data_speed.py                    # 300 JPEGs of about 500x375, q90
    python benchmarks/data_speed.py --smoke            # CI: a few small files

Writes ImageNet-like JPEGs (random colour fields from coarse to fine, plus noise; 500x375
in both orientations, quality 90, about ImageNet's mean file size of ~110 KB) to a temporary folder, then times, in this one
process with one thread (= one data-loader worker on one core):
  pil      util.datasets.checked_loader + pretrain_transform (PIL decode,
           RandomResizedCrop(scale 0.2-1, bicubic), flip, ToTensor, Normalize): today's path;
  worker   util.gpu_aug.read_encoded + PlanCrop: what a worker does when the device decodes;
  tensor   the whole util.gpu_aug path (decode_jpeg + crop/resize on tensors) on --device:
           on CPU a per-core rate; on CUDA the GPU's decode + augmentation rate (plus the
           worker side in the same thread).
Rates are medians over rounds through all files. The GPU side is an ESTIMATE, not a
measurement: training images/s of one H100 at --mfu of --peak_tflops (989 dense bf16
TFLOP/s) from the FLOPs model of benchmarks/pretrain_speed.py, divided by the per-core rate.
"""
import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.dirname(os.path.abspath(__file__))):
    if p not in sys.path:
        sys.path.insert(0, p)

import numpy as np  # noqa: E402
import PIL  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image  # noqa: E402

import models_mae  # noqa: E402
from pretrain_speed import model_flops_per_image  # noqa: E402
from util.datasets import checked_loader, pretrain_transform  # noqa: E402
from util.gpu_aug import PlanCrop, decode_augment, read_encoded  # noqa: E402


def natural_like(rng, width, height):
    """A colour image with ImageNet-like JPEG statistics: large smooth regions, edges,
    mid-frequency texture and sensor noise (not white noise, which compresses badly)."""
    def field(cells_x, cells_y, amp):
        small = rng.uniform(0, 255, size=(cells_y, cells_x, 3)).astype(np.uint8)
        big = Image.fromarray(small).resize((width, height), Image.BICUBIC)
        return (np.asarray(big, dtype=np.float32) - 127.5) * amp
    # coarse to fine; tuned so that files average about ImageNet's ~110 KB at quality 90
    img = 127.5 + field(4, 3, 0.9) + field(24, 18, 0.35) + field(width // 4, height // 4, 0.4) \
        + field(width // 2, height // 2, 0.35)
    img += rng.normal(0, 10, size=img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def write_images(folder, n, size=(500, 375), quality=90, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "class_0"), exist_ok=True)
    paths = []
    for i in range(n):
        w, h = size if i % 3 else size[::-1]  # a third portrait, as in ImageNet
        path = os.path.join(folder, "class_0", f"img_{i:05d}.jpg")
        natural_like(rng, w, h).save(path, quality=quality)
        paths.append(path)
    return paths


def rate(fn, items, rounds):
    """Median images/s over `rounds` passes through all items."""
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn(items)
        times.append(time.perf_counter() - t)
    return len(items) / statistics.median(times), [len(items) / t for t in times]


def run(cli):
    torch.set_num_threads(1)  # one worker = one core
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_images(tmp, cli.num_images, (cli.width, cli.height), cli.quality)
        mean_kb = statistics.mean(os.path.getsize(p) for p in paths) / 1024
        pil_tf = pretrain_transform(cli.input_size)
        plan = PlanCrop()

        def pil(ps):
            for p in ps:
                pil_tf(checked_loader(p))

        def worker(ps):
            for p in ps:
                plan(read_encoded(p))

        def tensor(ps):
            for i in range(0, len(ps), cli.batch_size):
                items = [plan(read_encoded(p)) for p in ps[i:i + cli.batch_size]]
                decode_augment([d for d, _ in items], torch.stack([q for _, q in items]),
                               cli.input_size, cli.device)
            if cli.device.startswith("cuda"):
                torch.cuda.synchronize()

        results = {}
        for name, fn in (("pil", pil), ("worker", worker), ("tensor", tensor)):
            fn(paths[:4])  # warm-up
            results[name] = rate(fn, paths, cli.rounds)
    return mean_kb, results


def gpu_estimates(cli):
    """ESTIMATED training images/s of one GPU: peak * mfu / (3 x forward FLOPs)."""
    out = {}
    for name in cli.models.split(","):
        with torch.device("meta"):  # shapes only, no memory
            model = models_mae.MODELS[name](img_size=cli.input_size)
        flops, _ = model_flops_per_image(model, 0.75)
        out[name] = (3 * flops, cli.peak_tflops * 1e12 * cli.mfu / (3 * flops))
    return out


def main(argv=None):
    p = argparse.ArgumentParser("input pipeline images/s per core")
    p.add_argument("--num_images", default=300, type=int)
    p.add_argument("--width", default=500, type=int)
    p.add_argument("--height", default=375, type=int)
    p.add_argument("--quality", default=90, type=int)
    p.add_argument("--input_size", default=224, type=int)
    p.add_argument("--batch_size", default=64, type=int, help="decode_augment batch (tensor path)")
    p.add_argument("--rounds", default=3, type=int)
    p.add_argument("--models", default="mae_vit_base_patch16,mae_vit_large_patch16")
    p.add_argument("--peak_tflops", default=989.0, type=float, help="H100 SXM dense bf16")
    p.add_argument("--mfu", default=0.5, type=float)
    p.add_argument("--device", default="cpu", help="where the tensor path decodes (cpu or cuda)")
    p.add_argument("--smoke", action="store_true", help="8 small files, 1 round")
    cli = p.parse_args(argv)
    if cli.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no GPU is available")
    if cli.smoke:
        cli.num_images, cli.width, cli.height, cli.rounds, cli.batch_size = 8, 160, 120, 1, 4
        cli.input_size = 64

    mean_kb, res = run(cli)
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, Pillow {PIL.__version__}; "
          f"{torch.backends.cpu.get_cpu_capability()}; {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"{cli.num_images} JPEGs {cli.width}x{cli.height} (a third portrait), quality {cli.quality}, "
          f"mean {mean_kb:.1f} KB; output {cli.input_size}px; 1 thread")
    for name, (r, all_r) in res.items():
        unit = "images/s on " + cli.device if name == "tensor" and cli.device != "cpu" else "images/s per core"
        print(f"{name:7s} {unit} {r:8.1f}  (rounds: {', '.join(f'{x:.1f}' for x in all_r)})")
    for name, (flops, ips) in gpu_estimates(cli).items():
        print(f"{name}: {flops / 1e9:.1f} GFLOP per training image; ESTIMATE one GPU at "
              f"{100 * cli.mfu:.0f}% of {cli.peak_tflops:g} TFLOP/s = {ips:.0f} images/s -> "
              f"PIL path needs {ips / res['pil'][0]:.1f} cores/GPU, device-decode path "
              f"{ips / res['worker'][0]:.1f} cores/GPU (worker side only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
