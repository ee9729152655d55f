"""Images/s of main_pretrain's training loaders (the default and --gpu_decode), measured so
that the figure is the one a long run sees:

    D=$(mktemp -d) && tar xf ../shared/data/imagenet-sample/images.tar -C "$D"
    python benchmarks/pipeline_rate.py --data_path "$D/imagenet-sample" --workers 1,2
    python benchmarks/pipeline_rate.py --smoke     # CI: a few generated JPEGs

- one long-lived iterator per loader over an endless sampler (TrainSampler's epochs one
  after another): no iterator is rebuilt, no epoch start (worker restart, prefetch refill,
  the abandoned epoch drained) falls inside the timed window;
- the warm-up (every worker started and its first prefetched batches out) outside it;
- at least --min_rounds batches per worker timed, so every worker has work all the time;
- the loaders built by main_pretrain.build_train_loader with the --num_workers a run
  would use (util.cli.resolve_num_workers, printed) unless --workers says otherwise.
The same function times both loaders. --method old adds, beside it, the method the
acceptance's pipeline section used before (a new iterator per measurement of a few
batches, so each restarts epoch 0 and drains the previous one), for comparison.
benchmarks/gpu_acceptance.py's pipeline section imports endless, Take and loader_rate.
"""
import argparse
import copy
import os
import sys
import tarfile
import tempfile
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.dirname(os.path.abspath(__file__))):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402
from torch.utils.data import DataLoader, Sampler  # noqa: E402

import main_pretrain  # noqa: E402
from util.cli import check_common_args, resolve_num_workers  # noqa: E402
from util.datasets import NormalizeOnDevice  # noqa: E402
from util.gpu_aug import DeviceDecodeLoader  # noqa: E402

warnings.filterwarnings("ignore", category=DeprecationWarning)  # torchvision.io's decoders
SHARED_TAR = os.path.join(ROOT, "..", "shared", "data", "imagenet-sample", "images.tar")


class Endless(Sampler):
    """The wrapped TrainSampler's epochs, one after another, without end."""

    def __init__(self, sampler):
        self.sampler = sampler

    def __iter__(self):
        epoch = 0
        while True:
            self.sampler.set_epoch(epoch)
            yield from iter(self.sampler)
            epoch += 1


def endless(built):
    """The loader main_pretrain.build_train_loader returned, over an endless sampler: the
    same dataset, collate, workers and device-side wrapper (NormalizeOnDevice or
    DeviceDecodeLoader)."""
    inner = built.loader if isinstance(built, (NormalizeOnDevice, DeviceDecodeLoader)) else built
    loader = DataLoader(inner.dataset, sampler=Endless(inner.sampler), batch_size=inner.batch_size,
                        num_workers=inner.num_workers, pin_memory=inner.pin_memory, drop_last=True,
                        collate_fn=inner.collate_fn, generator=torch.Generator().manual_seed(0))
    if inner is built:
        return loader
    wrapped = copy.copy(built)  # its stream, normaliser and device kept
    wrapped.loader, wrapped.sampler = loader, inner.sampler
    return wrapped


class Take:
    """The next n batches of a long-lived iterator, as a loader of length n (for
    engine_pretrain.train_one_epoch); iterating it again takes the following n."""

    def __init__(self, it, n, sampler=None):
        self.it, self.n, self.sampler = it, n, sampler

    def __len__(self):
        return self.n

    def __iter__(self):
        for _ in range(self.n):
            yield next(self.it)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def warm_up_batches(workers):
    """Batches taken before the timed window: every worker's first prefetched batches
    (DataLoader's prefetch_factor 2) and the device wrapper's one ahead."""
    return 2 * max(workers, 1) + 2


def loader_rate(it, batch, workers, device, min_rounds=4, steps=None, consume=None):
    """images/s of a long-lived iterator `it`: warm-up batches untimed, then `steps` batches
    (default min_rounds per worker, at least 8) timed. consume(batch) is the work per batch
    (default none: the loader alone). Returns (img/s, images' shape, timed steps)."""
    for _ in range(warm_up_batches(workers)):
        images, *_ = next(it)
    steps = steps or max(8, min_rounds * max(workers, 1))
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        images, *rest = next(it)
        if consume is not None:
            consume(images, *rest)
    sync(device)
    return steps * batch / (time.perf_counter() - t0), tuple(images.shape), steps


def old_rate(built, batch, steps, device):
    """The acceptance's former method, kept to show what it measured: a new iterator over
    the epoch-restarting loader for each measurement, 2 untimed batches, `steps` timed."""
    def cycled(n):
        k, epoch = 0, 0
        while True:
            built.sampler.set_epoch(epoch)
            for b in built:
                yield b
                k += 1
                if k == n:
                    return
            epoch += 1
    it = cycled(steps + 2)
    for _ in range(2):
        next(it)
    sync(device)
    t0 = time.perf_counter()
    for _ in it:
        pass
    sync(device)
    return steps * batch / (time.perf_counter() - t0)


def build(data, batch, size, device, workers, gpu_decode, extra=()):
    """main_pretrain's train loader for these settings, and the line saying its workers."""
    argv = ["--data_path", data, "--batch_size", str(batch), "--input_size", str(size), "--device", str(device)]
    argv += (["--num_workers", str(workers)] if workers is not None else []) + list(extra)
    argv += ["--gpu_decode"] if gpu_decode else []
    args = main_pretrain.get_args_parser().parse_args(argv)
    check_common_args(args)
    line = resolve_num_workers(args)
    return main_pretrain.build_train_loader(args, torch.device(device)), args.num_workers, line


def class_tree(src, dst, classes=10):
    """src's images (a flat folder, as the shared imagenet-sample) as dst/{train,val}/c*
    symlinks, for an ImageFolder; val: every 10th image."""
    files = sorted(f for f in os.listdir(src) if f.lower().endswith((".jpeg", ".jpg")))
    for i, f in enumerate(files):
        d = os.path.join(dst, "val" if i % 10 == 9 else "train", f"c{i % classes}")
        os.makedirs(d, exist_ok=True)
        os.symlink(os.path.abspath(os.path.join(src, f)), os.path.join(d, f))
    return len([f for i, f in enumerate(files) if i % 10 != 9])


def measure(cli, data, n_train):
    print(f"| loader | workers | images/s (one long-lived iterator, warm-up untimed) | timed batches |"
          + (" images/s, old method (new iterator per measurement) |" if "old" in cli.method else ""))
    print("| --- | --- | --- | --- |" + (" --- |" if "old" in cli.method else ""))
    for workers in cli.workers or [None]:
        for label, gpu_decode in (("default (util/jpeg.py)", False), ("--gpu_decode (util/gpu_aug.py)", True)):
            built, n_workers, line = build(data, cli.batch_size, cli.input_size, cli.device, workers, gpu_decode)
            it = iter(endless(built))
            rate, shape, steps = loader_rate(it, cli.batch_size, n_workers, cli.device, cli.min_rounds)
            assert shape == (cli.batch_size, 3, cli.input_size, cli.input_size), shape
            close(it)
            row = f"| {label} | {n_workers} | {rate:,.1f} | {steps} |"
            if "old" in cli.method:
                row += f" {old_rate(built, cli.batch_size, cli.old_steps, cli.device):,.1f} |"
            print(row, flush=True)
            if workers is None:
                print(line)
            del built


def close(it):
    if hasattr(it, "close"):
        it.close()  # a generator (the device wrapper): its decode thread ends
    del it


def main(argv=None):
    p = argparse.ArgumentParser("training loaders' images/s, measured as a long run sees them")
    p.add_argument("--data_path", default=None, help="a flat folder of JPEGs (default: unpack " + SHARED_TAR + ")")
    p.add_argument("--workers", default="", help="DataLoader worker counts, e.g. 1,2 (default: the run's default)")
    p.add_argument("--batch_size", default=64, type=int)
    p.add_argument("--input_size", default=224, type=int)
    p.add_argument("--device", default="cpu")
    p.add_argument("--min_rounds", default=4, type=int, help="timed batches per worker (at least 8 in all)")
    p.add_argument("--method", default="new,old", help="new, or new,old to add the former method")
    p.add_argument("--old_steps", default=20, type=int, help="the former method's timed batches")
    p.add_argument("--smoke", action="store_true", help="24 generated JPEGs, batch 4, 32 px")
    cli = p.parse_args(argv)
    cli.workers = [int(k) for k in cli.workers.split(",") if k]
    torch.set_num_threads(1)  # the training process's decode thread on its core, as the workers on theirs
    with tempfile.TemporaryDirectory() as tmp:
        src = cli.data_path
        if cli.smoke:
            from gpu_acceptance import write_jpegs
            cli.batch_size, cli.input_size, cli.old_steps = 4, 32, 4
            write_jpegs(os.path.join(tmp, "gen"), 24, [(60, 45), (45, 60)], 1)
            data, n = os.path.join(tmp, "gen"), 24
        else:
            if src is None:
                with tarfile.open(SHARED_TAR) as tar:
                    tar.extractall(tmp, filter="data")
                src = os.path.join(tmp, "imagenet-sample")
            data = os.path.join(tmp, "tree")
            n = class_tree(src, data)
        print(f"torch {torch.__version__}; {n} training images, batch {cli.batch_size}, {cli.input_size} px, "
              f"device {cli.device}; {os.cpu_count()} CPUs; load {' '.join(open('/proc/loadavg').read().split()[:3])}")
        measure(cli, data, n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
