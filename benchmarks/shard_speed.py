"""Shards (make_shards.py, util/shards.py) vs the ImageFolder: file-system calls per image
and images/s per core of the training loader, on local disk and on a simulated shared file
system.

    bash benchmarks/install_shard_bench.sh        # strace, libfuse2, mfusepy (once, as root)
    python benchmarks/shard_speed.py --dataset imagenet-sample    # in --data_root ../shared/data
    python benchmarks/shard_speed.py --dataset tiny-imagenet-100 --input_size 64 --images 2000
    python benchmarks/shard_speed.py --smoke                      # generated JPEGs, 1 round

The data is unpacked into --work as an ImageFolder (imagenet-sample's flat files go into
train/<wnid>/) and converted with make_shards.py (default shard size), once. Then, in one run:

1. calls: `strace -f -yy` counts the system calls on the data files (opens, reads, stats,
   seeks, closes) that the loader's worker makes over --images images, per 1,000 images.
2. local disk: the training loader of main_pretrain (util.datasets.build_train_set +
   train_loader: the default fast decode, per-sample seeding, 224 px or --input_size) over
   the same fixed random --images images, from files and from shards, with 1 and 2 workers.
   Rates are images/s divided by the workers (the cores they use).
3. simulated shared file system: the same, the data read through a FUSE passthrough
   (mfusepy, in a child process) that sleeps --latency_ms in every request it serves:
   lookup/getattr (stat), open, read, flush (close), release, readdir. This is a
   SIMULATION of a network file system's round trip, not a measurement of one (network
   emulation qdiscs are not available here). The kernel keeps libfuse's default caches
   (entries and attributes for 1 s) and reads with direct_io, so every read reaches the
   "server", as for an epoch larger than the client's page cache. It prints the requests
   per image of each path; the server runs on the same 2 cores as the loaders. It serves
   requests concurrently, as a network file system does (libfuse's default multithreaded
   loop; Python's time.sleep releases the GIL): 32 reads of 10 ms each take ~340 ms from
   one thread and ~35 ms from 16. The shard loader uses that: each batch's reads are issued
   together (util.shards.ShardImageFolder.prefetch, 16 threads per worker), then decoded
   one by one; the ImageFolder (torchvision's) reads each image when it decodes it.

Each round runs every loader once (one epoch over the --images images, the order of the
paths reversed every other round); rates are medians over rounds, ratios medians of the
per-round ratios. Three rates per core: `wall` (images/s / workers), `own` (images per
worker-second less the time the workers waited for a CPU held by other processes, from
/proc/PID/schedstat: the rate if each worker had its core; this machine is shared) and
`cpu` (images per CPU-second of the workers, all their threads: no file-system latency in it). The FUSE
server runs at nice -15, as if on another machine. The load average is printed.
"""
import argparse
import collections
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import Subset  # noqa: E402

OPS = ("getattr", "readdir", "open", "read", "flush", "release")


def load():
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


# ---- data ---------------------------------------------------------------------------------
def prepare(dataset, data_root, work):
    """work/folder (an ImageFolder with train/) and work/shards, made once."""
    folder, shards = os.path.join(work, "folder"), os.path.join(work, "shards")
    if not os.path.isdir(os.path.join(folder, "train")):
        os.makedirs(folder, exist_ok=True)
        if dataset == "smoke":
            make_smoke(os.path.join(folder, "train"))
        elif dataset == "imagenet-sample":
            with tarfile.open(os.path.join(data_root, dataset, "images.tar")) as t:
                t.extractall(work, filter="data")
            for name in sorted(os.listdir(os.path.join(work, dataset))):
                cls = os.path.join(folder, "train", name.split("_")[0])
                os.makedirs(cls, exist_ok=True)
                os.rename(os.path.join(work, dataset, name), os.path.join(cls, name))
        else:
            with tarfile.open(os.path.join(data_root, dataset, "train.tar.gz")) as t:
                t.extractall(folder, filter="data")
    if not os.path.isfile(os.path.join(shards, "train", "index.json")):
        subprocess.run([sys.executable, os.path.join(ROOT, "make_shards.py"), "--src", folder, "--dst", shards,
                        "--splits", "train"], check=True, stdout=subprocess.DEVNULL)
    return folder, shards


def make_smoke(root):
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in range(4):
        os.makedirs(os.path.join(root, f"c{c}"))
        for i in range(16):
            img = Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8))
            img.save(os.path.join(root, f"c{c}", f"{i}.JPEG"), quality=90)


# ---- the training loader --------------------------------------------------------------------
def parse(path, input_size, workers, batch):
    from main_pretrain import get_args_parser
    return get_args_parser().parse_args(["--data_path", path, "--input_size", str(input_size), "--batch_size",
                                         str(batch), "--num_workers", str(workers), "--no_pin_mem"])


def make_loader(path, input_size, workers, indices, batch, gpu_decode=False):
    """main_pretrain's training loader over the images `indices`, and the dataset's build
    time. gpu_decode: its worker side only (read + JPEG header + crop box; the decode and
    augmentation would run on the GPU)."""
    from util.datasets import build_dataset, build_train_set, on_device, pretrain_transform, train_loader
    from util.gpu_aug import PlanCrop, collate_encoded, read_encoded
    args = parse(path, input_size, workers, batch)
    t0 = time.perf_counter()
    if gpu_decode:
        dataset = build_dataset(args, "train", PlanCrop(), loader=read_encoded)
        build_s = time.perf_counter() - t0
        return train_loader(Subset(dataset, indices), args, seed=0, collate_fn=collate_encoded), build_s
    dataset, normalize = build_train_set(args, pretrain_transform(input_size))
    build_s = time.perf_counter() - t0
    return on_device(train_loader(Subset(dataset, indices), args, seed=0), normalize, "cpu"), build_s


def read_cost(paths, args, indices, label):
    """Microseconds per image to fetch its bytes alone (util.shards.read_bytes as the loader,
    in this process: no decode, no workers): one image at a time (dataset[i]), and a batch
    at a time as the training loader's fetcher asks (__getitems__ where the dataset has it:
    shards prefetch the batch's reads concurrently; an ImageFolder reads one by one)."""
    from util.datasets import build_dataset
    from util.shards import read_bytes
    sets = {name: build_dataset(parse(path, args.input_size, 0, 1), "train", None, loader=read_bytes)
            for name, path in paths.items()}
    batches = [indices[k:k + args.batch_size] for k in range(0, len(indices), args.batch_size)]
    def one_by_one(ds):
        for i in indices:
            ds[i]

    def by_batch(ds):
        for b in batches:
            ds.__getitems__(b) if hasattr(ds, "__getitems__") else [ds[i] for i in b]
    ways = {"one by one": one_by_one, "by batch": by_batch}
    got = collections.defaultdict(list)
    for r in range(args.rounds + 1):
        for name in (list(sets) if r % 2 == 0 else list(sets)[::-1]):
            for way, fetch in ways.items():
                t0 = time.perf_counter()
                fetch(sets[name])
                if r:  # round 0 warms the caches and opens the shards
                    got[name, way].append((time.perf_counter() - t0) / len(indices) * 1e6)
    for way in ways:
        med = {name: statistics.median(got[name, way]) for name in sets}
        ratio = statistics.median(f / s for f, s in zip(got["files", way], got["shards", way]))
        print(f"{label:<19} read only      files {med['files']:7.0f} us / shards {med['shards']:7.0f} us per image: "
              f"shards {ratio:.2f}x faster ({way}; 1 process, no decode; load {load()})", flush=True)


def schedstat(pids):
    """Summed (CPU ns, ns spent waiting for a CPU) of processes, from /proc/PID/schedstat:
    the CPU of all their threads (the shard readers' too), the wait of their main threads
    (the ones that decode: the workers' pace)."""
    total = np.zeros(2)
    for pid in pids:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                cpu, wait = (int(v) for v in f.read().split()[:2])
            total += [cpu, wait if int(task) == pid else 0]
    return total


def workers_of(loader):
    """The pids of a (NormalizeOnDevice-wrapped) loader's persistent workers: private
    DataLoader state, read here for the benchmark only."""
    return [w.pid for w in getattr(loader, "loader", loader)._iterator._workers]


def epoch(loader, e):
    """One epoch of `loader`: (images, wall s, workers' CPU s, workers' s waiting for a CPU)."""
    loader.sampler.set_epoch(e)
    pids = workers_of(loader)
    s0, t0, n = schedstat(pids), time.perf_counter(), 0
    for batch in loader:
        n += len(batch[-1])  # the targets
    wall, (cpu, waited) = time.perf_counter() - t0, (schedstat(pids) - s0) / 1e9
    return n, wall, cpu, waited


def rates(n, wall, cpu, waited, workers):
    """Images/s per core: by wall time; 'own core': by the workers' wall time less the time
    they waited for a CPU that other processes held (this machine is shared); by CPU time."""
    return {"wall": n / wall / workers, "own": n / (wall * workers - waited), "cpu": n / cpu}


def pick(path, n, seed=0):
    """n fixed random training indices (the same images for both paths)."""
    from util.shards import ShardImageFolder
    total = len(ShardImageFolder(os.path.join(path, "train")))
    return sorted(np.random.default_rng(seed).choice(total, min(n, total), replace=False).tolist())


def compare(paths, args, indices, label, counter=None):
    """files vs shards, each worker count: images/s per core (see rates) and shards/files."""
    batch = min(args.batch_size, len(indices))
    for workers in args.workers:
        loaders, got, builds, requests = {}, collections.defaultdict(list), {}, {}
        for name, path in paths.items():
            loaders[name], builds[name] = make_loader(path, args.input_size, workers, indices, batch,
                                                      args.gpu_decode)
            iter(getattr(loaders[name], "loader", loaders[name]))  # start the persistent workers
            epoch(loaders[name], 0)  # shards opened, page cache warm
        for r in range(args.rounds):
            for name in (list(paths) if r % 2 == 0 else list(paths)[::-1]):
                if counter is not None:
                    counter.reset()
                got[name].append(rates(*epoch(loaders[name], r + 1), workers))
                if counter is not None:
                    requests[name] = counter.per_image(len(indices) // batch * batch)
        cells = []
        for kind in ("wall", "own", "cpu"):
            med = {k: statistics.median(x[kind] for x in v) for k, v in got.items()}
            ratio = statistics.median(s[kind] / f[kind] for s, f in zip(got["shards"], got["files"]))
            cells.append(f"{kind} {med['files']:6.1f} / {med['shards']:6.1f} = {ratio:4.2f}x")
        print(f"{label:<19} {workers} worker{'s' if workers > 1 else ' '}  files / shards img/s/core, shards/files: "
              + "  |  ".join(cells) + f"  (build {builds['files']:.2f} s / {builds['shards']:.2f} s; "
              f"load {load()})", flush=True)
        for name, req in requests.items():
            print(f"{'':<19}   {name:<6} requests per image: " + "  ".join(f"{k} {v:.2f}" for k, v in req.items()
                                                                     if v) + f"  = {sum(req.values()):.2f}")
        del loaders


# ---- 1. system calls on the data files ----------------------------------------------------------
SYSCALLS = "openat,open,read,pread64,readv,preadv,preadv2,lseek,close,fstat,newfstatat,statx,stat,lstat,ioctl,mmap"
KIND = {"openat": "open", "open": "open", "read": "read", "pread64": "read", "readv": "read", "preadv": "read", "preadv2": "read",
        "fstat": "stat", "newfstatat": "stat", "statx": "stat", "stat": "stat", "lstat": "stat",
        "lseek": "seek", "close": "close", "ioctl": "ioctl", "mmap": "mmap"}


def count_calls(path, args, indices, work):
    """System calls on files under `path`, per 1,000 images, made by the loader's worker."""
    log = os.path.join(work, "strace.log")
    cmd = ["strace", "-f", "-qq", "-yy", "--seccomp-bpf", "-e", f"trace={SYSCALLS}", "-o", log, sys.executable,
           os.path.abspath(__file__), "--one_epoch", path, "--input_size", str(args.input_size),
           "--batch_size", str(args.batch_size), "--indices", ",".join(map(str, indices))]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    counts, main = collections.Counter(), None
    with open(log) as f:
        for line in f:
            pid, _, rest = line.partition(" ")
            main = main or pid  # the loader's own process: the dataset scan, not per image
            m = re.match(r"\s*(\w+)\(", rest)
            if m and pid != main and os.path.realpath(path) in rest:
                counts[KIND[m.group(1)]] += 1
    n = len(indices) // args.batch_size * args.batch_size
    return {k: 1000 * v / n for k, v in sorted(counts.items())}


def one_epoch(path, args):
    indices = [int(i) for i in args.indices.split(",")]
    loader, _ = make_loader(path, args.input_size, 1, indices, args.batch_size)
    for _ in loader:
        pass


# ---- 3. the simulated shared file system -----------------------------------------------------------
class Counter:
    """Requests served, by type, in shared memory (the server is another process)."""

    def __init__(self):
        import multiprocessing
        self.values = multiprocessing.get_context("fork").Array("q", len(OPS))

    def add(self, op):
        with self.values.get_lock():
            self.values[OPS.index(op)] += 1

    def reset(self):
        with self.values.get_lock():
            self.values[:] = [0] * len(OPS)

    def per_image(self, n):
        return {op: v / n for op, v in zip(OPS, self.values[:])}


def serve(backing, mountpoint, latency_s, counter):
    import mfusepy
    os.nice(-15)  # the "server" is another machine: it does not queue behind the loaders

    class LatencyPassthrough(mfusepy.Operations):
        """Read-only passthrough of `backing`; every request sleeps latency_s first."""
        use_ns = True

        def slow(self, op):
            counter.add(op)
            time.sleep(latency_s)

        def getattr(self, path, fh=None):
            self.slow("getattr")
            try:
                st = os.lstat(backing + path)
            except OSError as e:
                raise mfusepy.FuseOSError(e.errno) from None
            return {k: getattr(st, k) for k in ("st_mode", "st_size", "st_nlink", "st_uid", "st_gid",
                                                "st_atime_ns", "st_mtime_ns", "st_ctime_ns")}

        def readdir(self, path, fh):
            self.slow("readdir")  # with each entry's type, as NFS's READDIRPLUS gives it
            return [".", ".."] + [(e.name, {"st_mode": e.stat(follow_symlinks=False).st_mode}, 0)
                                  for e in os.scandir(backing + path)]

        def open(self, path, flags):
            self.slow("open")
            return os.open(backing + path, os.O_RDONLY)

        def read(self, path, size, offset, fh):
            self.slow("read")
            return os.pread(fh, size, offset)

        def flush(self, path, fh):
            self.slow("flush")
            return 0

        def release(self, path, fh):
            self.slow("release")
            os.close(fh)
            return 0

    mfusepy.FUSE(LatencyPassthrough(), mountpoint, foreground=True, ro=True, direct_io=True,
                 fsname="latency_passthrough")


class SimulatedFS:
    """`backing` mounted at a temporary mount point through serve(), for a with-block."""

    def __init__(self, backing, latency_ms, counter):
        self.backing, self.latency_s, self.counter = backing, latency_ms / 1000, counter

    def __enter__(self):
        import multiprocessing
        self.mnt = tempfile.mkdtemp(prefix="shard_speed_mnt_")
        self.proc = multiprocessing.get_context("fork").Process(
            target=serve, args=(self.backing, self.mnt, self.latency_s, self.counter), daemon=True)
        self.proc.start()
        t0 = time.time()
        while not os.path.ismount(self.mnt):
            if time.time() - t0 > 30 or not self.proc.is_alive():
                self.__exit__()
                raise RuntimeError("the FUSE mount did not come up (bash benchmarks/install_shard_bench.sh)")
            time.sleep(0.05)
        return self.mnt

    def __exit__(self, *exc):
        if os.path.ismount(self.mnt):
            subprocess.run(["umount", self.mnt], check=False)
        self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        os.rmdir(self.mnt)


# ---- main ----------------------------------------------------------------------------------------------
def get_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="imagenet-sample", help="imagenet-sample or tiny-imagenet-100")
    p.add_argument("--data_root", default=os.path.join(os.path.dirname(ROOT), "shared", "data"),
                   help="the folder holding --dataset (default ../shared/data)")
    p.add_argument("--work", default=None, help="where the ImageFolder and shards go (default /tmp/shard_speed/DATASET)")
    p.add_argument("--images", type=int, default=1000, help="images per epoch (a fixed random subset)")
    p.add_argument("--input_size", type=int, default=224)
    p.add_argument("--batch_size", type=int, default=50)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--latency_ms", type=float, default=1.0, help="simulated latency of every file-system request")
    p.add_argument("--gpu_decode", action="store_true", help="time the worker side of --gpu_decode's loader "
                   "(read, JPEG header, crop box) instead of the default fast-decode loader")
    p.add_argument("--smoke", action="store_true", help="64 generated JPEGs, 1 round")
    p.add_argument("--one_epoch", default=None, help=argparse.SUPPRESS)  # count_calls' child
    p.add_argument("--indices", default=None, help=argparse.SUPPRESS)
    return p.parse_args()


def main():
    args = get_args()
    torch.set_num_threads(1)
    if args.one_epoch:
        return one_epoch(args.one_epoch, args)
    if args.smoke:
        args.dataset, args.images, args.rounds, args.batch_size, args.input_size = "smoke", 48, 1, 8, 64
    work = args.work or os.path.join(tempfile.gettempdir(), "shard_speed", args.dataset)
    folder, shards = prepare(args.dataset, args.data_root, work)
    indices = pick(shards, args.images)
    args.batch_size = min(args.batch_size, len(indices))
    print(f"{args.dataset}: {len(indices)} of the training images per epoch, batch {args.batch_size}, "
          f"{'the worker side of --gpu_decode' if args.gpu_decode else 'the default fast-decode loader'}, "
          f"{args.input_size} px, {args.rounds} rounds; data in {work}; torch {torch.__version__}, "
          f"{os.cpu_count()} cores, load {load()}", flush=True)
    paths = {"files": folder, "shards": shards}
    if shutil.which("strace"):
        for name, path in paths.items():
            calls = count_calls(path, args, indices, work)
            print(f"calls per 1,000 images ({name:<6}, strace, 1 worker): "
                  + "  ".join(f"{k} {v:.0f}" if v >= 10 else f"{k} {v:.1f}" for k, v in calls.items()) + f"  = {sum(calls.values()):.0f}", flush=True)
    else:
        print("strace not found (bash benchmarks/install_shard_bench.sh): no call counts")
    read_cost(paths, args, indices, "local disk")
    compare(paths, args, indices, "local disk")
    counter = Counter()
    with SimulatedFS(work, args.latency_ms, counter) as mnt:
        sim = {name: os.path.join(mnt, os.path.relpath(path, work)) for name, path in paths.items()}
        read_cost(sim, args, indices, f"simulated FS {args.latency_ms:g} ms")
        compare(sim, args, indices, f"simulated FS {args.latency_ms:g} ms", counter)


if __name__ == "__main__":
    main()
