"""ImageFolders as tar shards (make_shards.py, util/shards.py): conversion, an interrupted and
resumed conversion, a rerun with other settings, reading (the same samples, labels and batches
as the ImageFolder path), bad indexes and shards as one line before the first step, open shards
bounded per worker, and an exact mid-epoch resume from shards."""
import copy
import io
import json
import os
import pickle
import resource
import shutil
import signal
import tarfile

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, Dataset, Subset

import make_shards
from conftest import assert_one_line_error, free_port, run_script
from test_data_pipeline import jpeg_folder, photo, save
from test_survival import RUN, assert_same_weights, final_model, kill_group, launch, wait_for_position
from util.datasets import EpochSeeded, SubsetImageFolder, checked_loader
from util.errors import UserError
from util.shards import ShardImageFolder, read_bytes


def folder(root, per_class=5):
    """jpeg_folder (grey, CMYK and PNG-named-JPEG files in train/) plus a third class with a
    nested folder and a file name with dots, for ImageFolder's order of walk."""
    jpeg_folder(root, per_class=per_class)
    for split in ("train", "val"):
        os.makedirs(root / split / "c" / "sub", exist_ok=True)
        save(photo(50, 70, seed=7), root / split / "c" / "x.v2.JPEG")
        save(photo(70, 50, seed=8), root / split / "c" / "sub" / "y.jpg")
    return str(root)


LIMIT = int(0.012 * 2**20)  # --shard_mb 0.012: a few images per shard


def convert(src, dst, *extra):
    proc = run_script("make_shards.py", "--src", src, "--dst", dst, "--shard_mb", "0.012", *extra)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    src = folder(root / "src")
    convert(src, str(root / "shards"), "--verify")
    return src, str(root / "shards")


# ---- conversion -----------------------------------------------------------------------
def test_conversion_keeps_the_imagefolder_order_labels_and_bytes(data):
    src, dst = data
    for split in ("train", "val"):
        files = SubsetImageFolder(os.path.join(src, split))
        shards = ShardImageFolder(os.path.join(dst, split), loader=read_bytes)
        assert len(json.load(open(os.path.join(dst, split, "index.json")))["shardlist"]) > 2
        assert shards.classes == files.classes == ["a", "b", "c"]
        assert shards.targets == files.targets and len(shards) == len(files)
        assert [n for n, _ in shards.samples] == [os.path.relpath(p, files.root) for p, _ in files.samples]
        for i, (path, target) in enumerate(files.samples):
            assert shards[i] == (open(path, "rb").read(), target)


def test_shards_are_webdataset_tars_that_wids_reads(data):
    import wids
    src, dst = data
    files = SubsetImageFolder(os.path.join(src, "train"))
    with tarfile.open(os.path.join(dst, "train", "000000.tar")) as tar:
        names = tar.getnames()
    assert names[:4] == ["00000000.jpeg", "00000000.cls", "00000001.jpeg", "00000001.cls"]
    ds = wids.ShardListDataset(os.path.join(dst, "train", "index.json"), transformations=[],
                               localname=lambda url: url)  # read in place, no cache copy
    assert len(ds) == len(files)
    for i, (path, target) in enumerate(files.samples):
        ext = "." + os.path.splitext(path)[1][1:].lower()
        assert ds[i][ext].read() == open(path, "rb").read() and int(ds[i][".cls"].read()) == target


def test_interrupted_conversion_resumes(tmp_path, monkeypatch):
    src = folder(tmp_path / "src")
    fresh, cut = tmp_path / "fresh", tmp_path / "cut"
    make_shards.convert_split(src, str(fresh), "train", LIMIT)
    calls, real = [0], make_shards.add_member

    def dies_at_the_twelfth_image(tar, name, raw):
        calls[0] += 1
        if calls[0] == 23:
            raise KeyboardInterrupt
        real(tar, name, raw)
    monkeypatch.setattr(make_shards, "add_member", dies_at_the_twelfth_image)
    with pytest.raises(KeyboardInterrupt):
        make_shards.convert_split(src, str(cut), "train", LIMIT)
    monkeypatch.setattr(make_shards, "add_member", real)
    left = sorted(os.listdir(cut / "train"))
    assert "index.json" not in left and any(n.endswith(".tmp") for n in left)  # not readable yet
    finished = [n for n in left if n.endswith(".tar")]
    assert len(finished) >= 3
    stamps = {n: os.stat(cut / "train" / n).st_mtime_ns for n in finished}
    (cut / "train" / finished[-1]).write_bytes((cut / "train" / finished[-1]).read_bytes()[:3000])
    proc = convert(src, str(cut), "--splits", "train", "--verify")
    assert f"keeping {len(finished) - 1} finished shards" in proc.stdout
    assert {n: os.stat(cut / "train" / n).st_mtime_ns for n in finished[:-1]} == \
        {n: stamps[n] for n in finished[:-1]}  # kept, not rewritten
    assert sorted(os.listdir(cut / "train")) == sorted(os.listdir(fresh / "train"))
    for n in os.listdir(fresh / "train"):  # the same shards as an uninterrupted conversion
        assert (cut / "train" / n).read_bytes() == (fresh / "train" / n).read_bytes(), n


def snapshot(split):
    return {n: (split / n).read_bytes() for n in sorted(os.listdir(split))}


def test_a_rerun_with_another_shard_mb_is_refused_or_rebuilt(tmp_path):
    src, dst = folder(tmp_path / "src"), tmp_path / "shards"
    convert(src, dst, "--splits", "train")
    before = snapshot(dst / "train")
    again = ("make_shards.py", "--src", src, "--dst", dst, "--splits", "train", "--shard_mb", "0.03")
    proc = run_script(*again)
    assert_one_line_error(proc, str(dst / "train"), "--shard_mb 0.012 (this run: 0.03)", "--rebuild")
    assert snapshot(dst / "train") == before  # refused before anything changed: the root still reads
    os.remove(dst / "train" / "index.json")  # as an interrupted conversion leaves it: refused too
    assert_one_line_error(run_script(*again), "--shard_mb 0.012 (this run: 0.03)")
    proc = run_script(*again, "--rebuild", "--verify")
    assert proc.returncode == 0 and "--rebuild: removed" in proc.stdout, proc.stderr
    make_shards.convert_split(src, str(tmp_path / "fresh"), "train", int(0.03 * 2**20))
    assert snapshot(dst / "train") == snapshot(tmp_path / "fresh" / "train")  # as converted at 0.03 at once
    assert len(snapshot(dst / "train")) < len(before)
    os.remove(dst / "train" / "make_shards.json")  # shards of an older make_shards.py: unknown settings
    assert_one_line_error(run_script(*again), "no readable make_shards.json", "--rebuild")


def test_a_rerun_on_another_source_is_refused_or_rebuilt_and_a_moved_one_resumes(tmp_path):
    src, dst = folder(tmp_path / "src"), tmp_path / "shards"
    convert(src, dst, "--splits", "train")
    moved = shutil.copytree(src, tmp_path / "moved copy")  # the same listing elsewhere: a resume
    n = len(json.load(open(dst / "train" / "index.json"))["shardlist"])
    assert f"keeping {n} finished shards" in convert(moved, dst, "--splits", "train").stdout
    save(photo(40, 40, seed=3), moved / "train" / "a" / "0b.JPEG")  # one image more, in class a
    proc = run_script("make_shards.py", "--src", moved, "--dst", dst, "--splits", "train", "--shard_mb", "0.012")
    assert_one_line_error(proc, "another source, 15 images in 3 classes", "this run: 16 in 3", "--rebuild")
    convert(moved, dst, "--splits", "train", "--rebuild", "--verify")
    assert len(ShardImageFolder(str(dst / "train"))) == 16


def test_class_subset_and_a_spawned_worker(data):
    src, dst = data
    files = SubsetImageFolder(os.path.join(src, "train"), classes=["c", "a"])
    shards = ShardImageFolder(os.path.join(dst, "train"), classes=["c", "a"], loader=read_bytes)
    assert shards.classes == ["c", "a"] and shards.targets == files.targets
    assert [shards[i][0] for i in range(len(shards))] == [open(p, "rb").read() for p, _ in files.samples]
    again = pickle.loads(pickle.dumps(shards))  # as a spawned worker gets it: no descriptors
    assert again.fds == {} and again[3] == shards[3]
    with pytest.raises(UserError, match="not in"):
        ShardImageFolder(os.path.join(dst, "train"), classes=["zz"], loader=read_bytes)


# ---- reading: what the ImageFolder path gives -------------------------------------------
def batches(loader, epochs=(0, 1)):
    out = []
    for epoch in epochs:
        loader.sampler.set_epoch(epoch)
        out += [b for b in loader]
    return out


def assert_same_batches(a, b):
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert len(x) == len(y)
        for u, v in zip(x, y):
            assert torch.equal(u, v)


@pytest.mark.parametrize("flags", [[], ["--fast_decode", "false"], ["--gpu_decode"]])
def test_pretrain_batches_equal_the_imagefolder_ones(data, tiny_args, flags):
    from main_pretrain import build_train_loader, get_args_parser
    src, dst = data
    got = {}
    for name, path, workers in (("files", src, "0"), ("shards", dst, "2")):
        args = get_args_parser().parse_args(tiny_args + ["--data_path", path, "--batch_size", "4",
                                                         "--num_workers", workers, *flags])
        got[name] = batches(build_train_loader(args, torch.device("cpu")))
    assert_same_batches(got["files"], got["shards"])


def test_linprobe_finetune_and_eval_batches_equal_the_imagefolder_ones(data, tmp_path):
    from eval_setup import build_data, linprobe_transform
    from main_finetune import get_args_parser, train_transform
    from util.datasets import class_names
    src, dst = data
    for make in (lambda a: linprobe_transform(a.input_size), train_transform):
        got = []
        for path in (src, dst):
            args = get_args_parser().parse_args(["--data_path", path, "--input_size", "32", "--batch_size", "4",
                                                 "--num_workers", "0", "--output_dir", str(tmp_path)])
            d = build_data(args, make(args))
            got.append((batches(d.train_loader), list(d.val_loader), class_names(d.train), class_names(d.val)))
        assert_same_batches(got[0][0], got[1][0])
        assert_same_batches(got[0][1], got[1][1])
        # the names a checkpoint keeps (main_export's id2label / label_names): the folders', from the index
        assert got[0][2:] == got[1][2:] == (sorted(os.listdir(os.path.join(src, "train"))),) * 2


def test_a_batch_read_together_gives_the_samples_of_reads_one_by_one(data):
    """EpochSeeded.__getitems__ (the DataLoader's batch fetch) prefetches a batch's bytes, also
    through a torch Subset: the same crops, flips and mask noise as per-item reads and as the
    ImageFolder, and nothing left over."""
    from torchvision import transforms
    src, dst = data
    aug = transforms.Compose([transforms.RandomResizedCrop(16), transforms.RandomHorizontalFlip(),
                              transforms.PILToTensor()])
    shards = ShardImageFolder(os.path.join(dst, "train"), aug, loader=checked_loader)
    files = EpochSeeded(Subset(SubsetImageFolder(os.path.join(src, "train"), aug), range(1, 14)), 3, 4)
    batched = EpochSeeded(Subset(shards, range(1, 14)), 3, 4)
    keys = [(2, i) for i in (7, 0, 12, 3, 5)]
    got, one_by_one, want = batched.__getitems__(keys), [batched[k] for k in keys], files.__getitems__(keys)
    assert shards.fetched == {}
    for g, o, w in zip(got, one_by_one, want):
        assert torch.equal(g[0], o[0]) and torch.equal(g[0], w[0]) and g[1] == o[1] == w[1]
        assert torch.equal(g[2], o[2]) and torch.equal(g[2], w[2])
    assert [s[1] for s in shards.__getitems__([4, 2])] == [shards.targets[4], shards.targets[2]]


def test_the_loader_reads_a_batch_concurrently_before_its_first_decode(data, monkeypatch):
    """Through train_loader's DataLoader (its fetcher calls __getitems__): a batch's reads are
    all in flight at once (a barrier of batch-size parties would time out on serial reads),
    and all precede the batch's first decode."""
    import threading
    from argparse import Namespace
    from util.datasets import train_loader
    src, dst = data
    events, real, barrier = [], os.pread, threading.Barrier(4, timeout=30)

    def pread(fd, n, offset):
        events.append("read")
        barrier.wait()
        return real(fd, n, offset)

    def loader(member):
        events.append("decode")
        return read_bytes(member)
    args = Namespace(batch_size=4, num_workers=0, pin_mem=False)
    shards = ShardImageFolder(os.path.join(dst, "train"), loader=loader)  # its shard check reads headers
    monkeypatch.setattr(os, "pread", pread)
    loader = train_loader(shards, args, seed=0, collate_fn=lambda b: list(zip(*b)))
    images, targets = next(iter(loader))
    assert events == ["read"] * 4 + ["decode"] * 4
    first = [i for _, i in list(loader.sampler)[:4]]
    files = SubsetImageFolder(os.path.join(src, "train"))
    assert list(images) == [open(files.samples[i][0], "rb").read() for i in first]
    assert list(targets) == [files.targets[i] for i in first]


# ---- bad shards --------------------------------------------------------------------------
def rewrite(shard, change):
    """Rewrite a shard's tar with change(member, data) -> (member, data), same layout."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m, raw in members:
            m, raw = change(m, raw)
            tar.addfile(m, fileobj=io.BytesIO(raw))


def spoil(dst, kind):
    """(spoilt shard, member named in the error)."""
    shard = os.path.join(dst, "train", "000001.tar")
    with tarfile.open(shard) as tar:
        image, cls = tar.getnames()[:2]
    if kind == "truncated":
        with open(shard, "r+b") as f:
            f.truncate(1500)
        return shard, image
    if kind == "missing label":
        def rename(m, raw):
            if m.name == cls:
                m = copy.copy(m)
                m.name = m.name[:-4] + ".txt"
            return m, raw
        rewrite(shard, rename)
        return shard, image
    rewrite(shard, lambda m, raw: (m, bytes(len(raw)) if m.name == image else raw))  # corrupt JPEG
    return shard, image


@pytest.mark.parametrize("kind", ["truncated", "missing label", "corrupt JPEG"])
def test_a_bad_shard_is_one_line_naming_shard_and_member(data, tmp_path, tiny_args, kind):
    src, good = data
    dst = tmp_path / "shards"
    shutil.copytree(good, dst)
    shard, member = spoil(str(dst), kind)
    if kind == "missing label":  # same size, same offsets: only the member name changed
        assert os.path.getsize(shard) == os.path.getsize(os.path.join(good, "train", "000001.tar"))
    proc = run_script("main_pretrain.py", *tiny_args, "--data_path", dst, "--batch_size", "4",
                      "--num_workers", "1", "--output_dir", tmp_path / "out")
    assert_one_line_error(proc, shard, member)
    proc = run_script("make_shards.py", "--src", src, "--dst", dst, "--verify_only", "--splits", "train")
    assert_one_line_error(proc, shard)


def copy_split(good, dst):
    shutil.copytree(good, dst)
    return dst / "train"


def edit_index(split, change):
    index = json.load(open(split / "index.json"))
    change(index)
    json.dump(index, open(split / "index.json", "w"))


def shard_entry_at(k, **fields):
    return lambda index: index["shardlist"][k].update(fields)


INDEX_FAULTS = {  # change of the index -> fragment of its one-line error
    "no classes": (lambda index: index.pop("classes"), "no `classes`"),
    "nsamples": (lambda index: index["shardlist"][1].update(nsamples=index["shardlist"][1]["nsamples"] + 1),
                 "shard 1 (000001.tar): `nsamples` is"),
    "a list cut short": (lambda index: index["shardlist"][2]["labels"].pop(), "but `labels` lists"),
    "first": (lambda index: index["shardlist"][2].update(first=0), "`first` is 0"),
    "a label past the classes": (lambda index: index["shardlist"][0]["labels"].__setitem__(0, 3),
                                 "a label outside 0..2"),
    "offsets past the file": (lambda index: index["shardlist"][1]["offsets"].__setitem__(-1, 10**6),
                              "do not lay the members out"),
    "a string size": (lambda index: index["shardlist"][1]["sizes"].__setitem__(0, "12"), "whole numbers"),
    "no shardlist": (lambda index: index.update(shardlist=[]), "no `shardlist`"),
    "no url": (lambda index: index["shardlist"][0].pop("url"), "shard 0: no `url`"),
    "no filesize": (lambda index: index["shardlist"][0].pop("filesize"), "no `filesize`"),
    "another format": (lambda index: index.update(format="wids"), "is not a shard index"),
}


@pytest.mark.parametrize("kind", INDEX_FAULTS)
def test_a_bad_index_is_one_line_when_the_dataset_is_built(data, tmp_path, kind):
    change, fragment = INDEX_FAULTS[kind]
    split = copy_split(data[1], tmp_path / "shards")
    edit_index(split, change)
    with pytest.raises(UserError) as e:
        ShardImageFolder(str(split))
    assert fragment in str(e.value) and "\n" not in str(e.value) and str(split / "index.json") in str(e.value)


def spoil_before_the_run(split, kind):
    """Fault `kind` in a copy of a shard split: (fragments of its one-line error)."""
    shard = split / "000001.tar"
    if kind in INDEX_FAULTS:
        change, fragment = INDEX_FAULTS[kind]
        edit_index(split, change)
        return str(split / "index.json"), fragment
    if kind == "missing shard":
        os.remove(shard)
        return f"cannot open shard {shard}: No such file or directory",
    if kind == "a directory for a shard":
        os.remove(shard)
        os.mkdir(shard)
        return f"shard {shard} is not a file",
    if kind == "zeros in a shard":  # what an interrupted copy that preallocated the file leaves
        first = json.load(open(split / "index.json"))["shardlist"][1]["first"]
        shard.write_bytes(bytes(os.path.getsize(shard)))
        return f"shard {shard} does not start with member {first:08d}.jpeg", "found no tar header"
    if kind == "another tar in its place":  # a shard of another conversion, of the same size
        data = bytearray(shard.read_bytes())
        data[:8] = b"00000099"
        shard.write_bytes(bytes(data))
        return f"shard {shard} does not start with member", "found '00000099.jpeg'"
    assert kind == "half-converted"
    os.remove(split / "index.json")
    return f"{split} holds", "tar shards but no index.json", "re-run make_shards.py"


@pytest.mark.parametrize("kind", ["no classes", "nsamples", "missing shard", "a directory for a shard",
                                  "zeros in a shard", "another tar in its place", "half-converted"])
def test_a_shard_fault_is_one_line_before_the_first_step(data, tmp_path, tiny_args, kind):
    split = copy_split(data[1], tmp_path / "shards dir")
    fragments = spoil_before_the_run(split, kind)
    proc = run_script("main_pretrain.py", *tiny_args, "--data_path", split.parent, "--batch_size", "4",
                      "--num_workers", "1", "--output_dir", tmp_path / "out")
    assert_one_line_error(proc, *fragments)
    assert "steps/epoch" not in proc.stdout  # the run's summary, printed before its first step


def test_an_unreadable_shard_is_one_line_when_the_dataset_is_built(data, tmp_path, monkeypatch):
    split = copy_split(data[1], tmp_path / "shards")
    real, shard = os.open, str(split / "000002.tar")

    def denied(path, *args, **kwargs):
        if path == shard:
            raise PermissionError(13, "Permission denied", path)
        return real(path, *args, **kwargs)
    monkeypatch.setattr(os, "open", denied)  # as a shard of another user without read permission
    with pytest.raises(UserError, match=f"^cannot read shard {shard}: Permission denied$"):
        ShardImageFolder(str(split))


def _rank_checks_shards(rank, world, port, good, bad, out):
    """On every rank: build the dataset of a split whose shard 000001.tar is zeroed, then of a
    good one; the ranks other than 0 count their stats of shard files (rank 0 checks)."""
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    stats, real = [], os.stat
    if rank:
        os.stat = lambda path, *a, **k: (stats.append(path) if str(path).endswith(".tar") else None) or real(path, *a, **k)
    try:
        ShardImageFolder(bad)
        error = None
    except UserError as e:
        error = str(e)
    n = len(ShardImageFolder(good))
    os.stat = real
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"error": error, "stats": len(stats), "n": n}, f)
    dist.destroy_process_group()


def test_rank_0_checks_the_shards_and_every_rank_stops_with_its_line(data, tmp_path):
    bad = copy_split(data[1], tmp_path / "bad")
    spoil_before_the_run(bad, "zeros in a shard")
    mp.spawn(_rank_checks_shards, args=(3, free_port(), os.path.join(data[1], "train"), str(bad), str(tmp_path)),
             nprocs=3, join=True)
    got = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(3)]
    assert got[0]["error"].startswith(f"shard {bad / '000001.tar'} does not start with member 00000003.jpeg")
    assert [g["error"] for g in got] == [got[0]["error"]] * 3
    assert [g["stats"] for g in got[1:]] == [0, 0] and [g["n"] for g in got] == [15] * 3


# ---- many shards: open files bounded ---------------------------------------------------------
LOW_LIMIT = 256  # `ulimit -n` of the runs below: max_open_shards() keeps 64 shards open


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory):
    """5,000 shards of one tiny JPEG each (train only), written with fsync off."""
    root = tmp_path_factory.mktemp("many")
    images = [io.BytesIO() for _ in range(7)]
    for k, buf in enumerate(images):
        photo(12, 10, seed=k).save(buf, format="JPEG", quality=90)
    for i in range(5000):
        os.makedirs(root / "src" / "train" / f"c{i % 10}", exist_ok=True)
        (root / "src" / "train" / f"c{i % 10}" / f"{i:04d}.jpg").write_bytes(images[i % 7].getvalue())
    with pytest.MonkeyPatch.context() as m:
        m.setattr(os, "fsync", lambda fd: None)
        make_shards.convert_split(str(root / "src"), str(root / "shards"), "train", 1)  # one image a shard
    assert len(os.listdir(root / "shards" / "train")) == 5000 + 2  # and index.json, make_shards.json
    return str(root / "src"), str(root / "shards")


def lower_open_files(worker_id):
    resource.setrlimit(resource.RLIMIT_NOFILE, (LOW_LIMIT, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


class OpenFiles(Dataset):
    """A sample's bytes with what its worker holds open just after reading it: (bytes,
    shards open, descriptors of the process)."""

    def __init__(self, shards):
        self.shards = shards

    def __len__(self):
        return len(self.shards)

    def __getitem__(self, i):
        return self.__getitems__([i])[0]

    def __getitems__(self, indices):
        self.shards.prefetch(indices)
        return [(self.shards.read(i).raw, len(self.shards.fds), len(os.listdir("/proc/self/fd")))
                for i in indices]


def test_a_worker_keeps_a_bounded_number_of_shards_open(many_shards):
    src, dst = many_shards
    shards = ShardImageFolder(os.path.join(dst, "train"))
    loader = DataLoader(OpenFiles(shards), batch_size=97, shuffle=True, num_workers=2, collate_fn=list,
                        worker_init_fn=lower_open_files, generator=torch.Generator().manual_seed(0))
    got = [sample for batch in loader for sample in batch]
    bound = LOW_LIMIT // 4
    assert len(got) == 5000
    assert max(open_shards for _, open_shards, _ in got) == bound  # reached, never passed
    descriptors = [n for _, _, n in got]
    assert max(descriptors) - min(descriptors) <= bound and max(descriptors) < LOW_LIMIT
    files = SubsetImageFolder(os.path.join(src, "train"))
    assert sorted(raw for raw, _, _ in got) == sorted(open(p, "rb").read() for p, _ in files.samples)


def test_a_root_of_5000_shards_trains_under_a_low_open_files_limit(many_shards, tmp_path, tiny_args):
    """The whole root is checked when the dataset is built; the training reads 2 of its 10
    classes (1,000 shards, each worker touching ~500 under `ulimit -n` 256) to keep it short."""
    src, dst = many_shards
    (tmp_path / "two.txt").write_text("c3\nc7\n")
    proc = run_script("main_pretrain.py", *tiny_args, "--data_path", dst, "--class_subset", tmp_path / "two.txt",
                      "--batch_size", "250", "--depth", "2", "--decoder_depth", "1", "--num_workers", "2",
                      "--output_dir", tmp_path / "out", preexec_fn=lambda: lower_open_files(None))
    assert proc.returncode == 0, proc.stderr[-2000:]
    # no val/: 10 of the 1,000 images are held out, 990 train in 3 steps of 250
    assert "held out 10 of 1000 images" in proc.stdout and "3 steps/epoch" in proc.stdout
    assert [json.loads(line)["epoch"] for line in open(tmp_path / "out" / "log.txt")] == [0]


# ---- exact resume ---------------------------------------------------------------------------
def test_killed_mid_epoch_on_shards_ends_with_the_weights_of_an_imagefolder_run(data, tmp_path):
    src, dst = data
    # RUN minus its synthetic data: 15 train images, batch 4 -> 3 steps per epoch
    base = [a for a in RUN if a not in ("--synthetic_size", "64")] + ["--batch_size", "4"]
    ref = launch(tmp_path / "ref", "--data_path", src, base=base)
    _, err = ref.communicate(timeout=600)
    assert ref.returncode == 0, err[-2000:]
    out = tmp_path / "shards"
    proc = launch(out, "--data_path", dst, base=base)
    wait_for_position(proc, out, (0, 2))
    kill_group(proc, signal.SIGKILL)
    proc = launch(out, "--data_path", dst, base=base)
    stdout, err = proc.communicate(timeout=600)
    assert proc.returncode == 0 and "resumed from" in stdout, err[-2000:]
    assert_same_weights(final_model(tmp_path / "ref"), final_model(out))
    logs = [[json.loads(line)["train_loss"] for line in open(d / "log.txt")] for d in (tmp_path / "ref", out)]
    assert logs[0] == logs[1]


def test_two_ranks_on_shards_end_with_the_weights_of_two_ranks_on_files(data, tmp_path):
    """The rank partition carries over: torchrun with 2 processes, shards vs ImageFolder."""
    src, dst = data
    base = [a for a in RUN if a not in ("--synthetic_size", "64")] + ["--batch_size", "2", "--epochs", "1"]
    for name, path in (("files", src), ("shards", dst)):
        proc = launch(tmp_path / name, "--data_path", path, base=base, torchrun=2)
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    final = [torch.load(tmp_path / n / "checkpoint-0.pth", weights_only=True)["model"] for n in ("files", "shards")]
    assert_same_weights(*final)


# ---- shards of an unlabeled tree or a file list ---------------------------------------------
def unlabeled_tree(root, n=22):
    """A classless nested tree of JPEG, PNG (RGBA, grey) and WebP images, no train/ or val/."""
    for i in range(n):
        sub = root / f"d{i % 3}" / ("deep" if i % 2 else "")
        sub.mkdir(parents=True, exist_ok=True)
        img = photo(40 + i, 36, seed=i)
        if i % 4 == 0:
            img.putalpha(128)
            img.save(sub / f"{i:02d}.png")
        elif i % 4 == 1:
            img.convert("L").save(sub / f"{i:02d}.webp")
        else:
            save(img, sub / f"{i:02d}.jpg")
    return root


def test_shards_of_an_unlabeled_tree_train_with_the_folders_losses(tmp_path, tiny_args):
    """make_shards --labels none: one split, train/, in the folder's listing order; with
    --labels none it trains as the folder does: the same held-out line, the same losses."""
    src = unlabeled_tree(tmp_path / "src")
    proc = convert(src, tmp_path / "shards", "--labels", "none", "--verify")
    assert "one split, train/" in proc.stdout and "verified train: 22 images" in proc.stdout
    assert sorted(os.listdir(tmp_path / "shards")) == ["train"]
    logs, held = {}, {}
    for name, path in (("files", src), ("shards", tmp_path / "shards")):
        out = tmp_path / name
        proc = run_script("main_pretrain.py", *tiny_args, "--data_path", path, "--labels", "none", "--batch_size", "4",
                          "--epochs", "2", "--num_workers", "1", "--output_dir", out)
        assert proc.returncode == 0, proc.stderr[-2000:]
        held[name] = [line for line in proc.stdout.splitlines() if "held out" in line][0].split("] ", 1)[-1]
        logs[name] = [json.loads(line)["train_loss"] for line in open(out / "log.txt")]
    assert held["files"] == held["shards"] and "held out 1 of 22 images" in held["files"]
    assert logs["files"] == logs["shards"] and len(logs["files"]) == 2
    proc = run_script("main_pretrain.py", *tiny_args, "--data_path", tmp_path / "shards", "--output_dir", tmp_path / "o")
    assert_one_line_error(proc, "shards of an unlabeled source", "use --labels none")


@pytest.mark.parametrize("labelled", [True, False])
def test_shards_of_a_file_list_give_the_lists_samples_and_batches(tmp_path, tiny_args, labelled):
    from main_pretrain import build_train_loader, get_args_parser
    from util.datasets import build_dataset
    src = unlabeled_tree(tmp_path / "imgs")
    files = sorted(p for p in src.rglob("*") if p.is_file())[::-1]  # a list's order is its own
    (tmp_path / "lists").mkdir()
    lines = [f"../imgs/{p.relative_to(src)}" + (f" {i % 3}" if labelled else "") for i, p in enumerate(files)]
    lines[3] = f"{files[3]}" + (" 0" if labelled else "")  # an absolute path too
    listed = tmp_path / "lists" / "l.txt"
    listed.write_text("\n".join(lines) + "\n")
    convert(listed, tmp_path / "shards", "--verify")
    flags = [] if labelled else ["--labels", "none"]
    got = {}
    for name, path in (("list", listed), ("shards", tmp_path / "shards")):
        args = get_args_parser().parse_args(tiny_args + ["--data_path", str(path), "--batch_size", "4",
                                                         "--holdout", "0.2", *flags])
        train = build_dataset(args, "train", None)
        got[name + "_targets"] = train.targets
        got[name + "_classes"] = len(train.classes)
        got[name] = batches(build_train_loader(args, torch.device("cpu")))
    assert got["list_targets"] == got["shards_targets"] and len(got["list_targets"]) == 18
    assert got["list_classes"] == got["shards_classes"] == (3 if labelled else 0)
    assert_same_batches(got["list"], got["shards"])
