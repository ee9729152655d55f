"""ImageFolder splits stored as tar shards (make_shards.py writes them), read by index.

On shared file systems (Lustre, GPFS, NFS) an ImageFolder costs every image an open, a
stat, reads and a close, each a round trip to the servers. A split converted to shards is
a few hundred files of a few hundred MB, opened once per worker process; each image is
then one positioned read (os.pread) of its bytes and its label (benchmarks/shard_speed.py).
A training batch's reads are issued together (prefetch, from util.datasets.EpochSeeded's
__getitems__): on a network file system their round trips then overlap instead of adding up.

Layout of a shard root (the webdataset layout, so webdataset and wids read it too):

    SHARD_ROOT/{train,val}/index.json      a wids descriptor, plus what this reader needs
    SHARD_ROOT/{train,val}/000000.tar ...  per image: 00000000.jpeg (the source file's own
                                           bytes and extension) then 00000000.cls (the label)
    SHARD_ROOT/{train,val}/make_shards.json  what make_shards.py converted it with (not read here)

ShardImageFolder is map-style: index i is the i-th sample of the ImageFolder the split came
from (sorted classes, then sorted files), with the same `classes` and `targets`, and it
hands the same loaders the same bytes. TrainSampler, EpochSeeded (augmentation seeded per
(epoch, index)), the rank partition and mid-epoch resume (util.datasets) therefore work
on it unchanged and give the samples, crops and losses of the ImageFolder path.

Why not wids.ShardListDataset itself (PRETRAIN.md compares the libraries): it copies or
locks every shard it opens (a `.lock` file written beside the shard, which fails on
read-only storage), and it indexes a shard on open by walking all its tar headers through
mmap, which reads most of the shard; with the global shuffle that keeps the ImageFolder
order, every worker touches every shard. Our index holds each member's offset instead.

Faults surface when the dataset is built, before any step: the index is validated (every
field read here), and rank 0 stats every shard and reads its first tar header (the other
ranks get its verdict). Each process keeps at most max_open_shards() shards open, a
quarter of its `ulimit -n`, closing the least recently used one first.
"""
import copy
import json
import os
import re
import resource
import stat
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np
from torch.utils.data import Dataset

from util.dist import broadcast_object, get_rank
from util.errors import UserError

INDEX = "index.json"
FORMAT = "mae-shards/1"
BLOCK = 512  # tar block
READERS = 16  # concurrent reads per process in prefetch: a 1 ms round trip each, overlapped
MIN_OPEN = 16  # open shards per process even under a tiny `ulimit -n`
SHARD_FILE = re.compile(r"\d{6}\.tar(\.tmp)?")  # make_shards.py's shard names (and unfinished ones)


def is_shard_split(root):
    """A split folder written by make_shards.py (recognised by its index)."""
    return os.path.isfile(os.path.join(root, INDEX))


def padded(n):
    return (n + BLOCK - 1) // BLOCK * BLOCK


def octal(field):
    """A tar header's number field (None if it is not one)."""
    try:
        return int(field.strip(b"\0 ") or b"0", 8)
    except ValueError:
        return None


def member_names(index, name):
    """Tar member names of sample `index` whose source file is `name`: (image, label)."""
    key = f"{index:08d}"
    return f"{key}.{os.path.splitext(name)[1][1:].lower() or 'img'}", f"{key}.cls"


class Member:
    """One image in a shard: its bytes, and a name for error messages. The image loaders
    (util.datasets.checked_loader, util.jpeg.DecodeCrop, util.gpu_aug.read_encoded) take
    it where an ImageFolder gives them a path. `name` may be a function (called for
    messages only)."""

    def __init__(self, raw, name):
        self.raw, self.name = raw, name

    def __str__(self):
        return self.name() if callable(self.name) else self.name


def read_bytes(source):
    """The encoded image: a shard Member's bytes, or a file's."""
    if isinstance(source, Member):
        return source.raw
    with open(source, "rb") as f:
        return f.read()


def unfinished_conversion(root):
    """A one-line hint if `root` holds make_shards.py's shards but no index (its conversion
    did not finish, or the index was lost), else None."""
    try:
        n = sum(1 for name in os.listdir(root) if SHARD_FILE.fullmatch(name))
    except OSError:
        return None
    if n == 0 or is_shard_split(root):
        return None
    return (f"{root} holds {n} tar shards but no {INDEX}: their conversion did not finish; "
            "re-run make_shards.py (it resumes), or point --data_path at the image folders")


def max_open_shards():
    """Shards one process keeps open at once: a quarter of its descriptor limit (`ulimit -n`;
    256 of the common 1,024), leaving room for a second split's shards (val, a kNN bank)
    and what the process already holds (CUDA, NCCL sockets, the DataLoader's pipes)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return max(MIN_OPEN, (2**20 if soft == resource.RLIM_INFINITY else soft) // 4)


def load_index(root):
    path = os.path.join(root, INDEX)
    try:
        with open(path) as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read shard index {path}: {e}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        found = index.get("format") if isinstance(index, dict) else None
        raise UserError(f"{path} is not a shard index of make_shards.py (format {found!r})")
    problem = index_problem(index)
    if problem:
        raise UserError(f"shard index {path}: {problem}; re-run make_shards.py")
    return index


def whole(value, least=0):
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def index_problem(index):
    """What makes the index unusable by this reader, in a few words (None if nothing): every
    field ShardImageFolder reads, its type, its length and its range."""
    classes, shards = index.get("classes"), index.get("shardlist")
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        return "no `classes` (the list of class names)"
    if len(set(classes)) != len(classes):
        return "`classes` names a class twice"
    if not isinstance(shards, list) or not shards or not all(isinstance(s, dict) for s in shards):
        return "no `shardlist` (a list of shard entries)"
    first = 0
    for k, s in enumerate(shards):
        where = f"shard {k} ({s['url']})" if isinstance(s.get("url"), str) and s["url"] else f"shard {k}"
        problem = entry_problem(s, first, len(classes))
        if problem:
            return f"{where}: {problem}"
        first += s["nsamples"]
    return None


def entry_problem(s, first, num_classes):
    """index_problem for one shard entry whose first sample should be `first`."""
    if not isinstance(s.get("url"), str) or not s["url"]:
        return "no `url` (the shard's file name)"
    for key, least in (("nsamples", 1), ("filesize", BLOCK), ("first", 0)):
        if not whole(s.get(key), least):
            return f"no `{key}` (a whole number, at least {least})"
    if s["first"] != first:
        return f"`first` is {s['first']}, but the shards before it hold {first} samples"
    n = s["nsamples"]
    for key in ("names", "labels", "offsets", "sizes"):
        if not isinstance(s.get(key), list):
            return f"no `{key}` (a list of {n})"
        if len(s[key]) != n:
            return f"`nsamples` is {n} but `{key}` lists {len(s[key])}"
    if not all(isinstance(name, str) and name for name in s["names"]):
        return "`names` holds an entry that is not a file name"
    labels, offsets, sizes = (np.asarray(s[key]) for key in ("labels", "offsets", "sizes"))
    if any(a.dtype.kind not in "iu" for a in (labels, offsets, sizes)):
        return "`labels`, `offsets` and `sizes` must be whole numbers"
    if num_classes == 0 and np.any(labels != -1):  # shards of an unlabeled source: label -1 throughout
        return "no `classes` but a label other than -1 (an unlabeled split's)"
    if num_classes and (labels.min() < 0 or labels.max() >= num_classes):
        return f"a label outside 0..{num_classes - 1} (the {num_classes} `classes`)"
    ends = offsets + (sizes + BLOCK - 1) // BLOCK * BLOCK + 2 * BLOCK  # the image, then its label member
    if sizes.min() < 0 or offsets[0] < BLOCK or np.any(offsets[1:] < ends[:-1] + BLOCK) or ends[-1] > s["filesize"]:
        return f"`offsets` and `sizes` do not lay the members out within its `filesize` {s['filesize']}"
    return None


def shard_fault(path, s):
    """What keeps the shard at `path` from being read as its index entry `s` says (one line),
    from a stat and a read of its first tar header; None if nothing."""
    try:
        info = os.stat(path)
    except OSError as e:
        return f"cannot open shard {path}: {e.strerror}"
    if not stat.S_ISREG(info.st_mode):
        return f"shard {path} is not a file"
    size = info.st_size
    if size < s["filesize"]:
        ends = np.asarray(s["offsets"]) + np.asarray(s["sizes"])
        k = int(np.searchsorted(ends, size, side="right"))
        name = member_names(s["first"] + k, s["names"][k])[0] if k < s["nsamples"] else "end of archive"
        return (f"shard {path} is truncated ({size} of {s['filesize']} bytes): member {name} "
                "onwards is missing; re-run make_shards.py")
    if size != s["filesize"]:
        return f"shard {path} has {size} bytes, its index says {s['filesize']}; re-run make_shards.py"
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            header = os.pread(fd, BLOCK, s["offsets"][0] - BLOCK)
        finally:
            os.close(fd)
    except OSError as e:
        return f"cannot read shard {path}: {e.strerror}"
    name, found = member_names(s["first"], s["names"][0])[0], header[:100].split(b"\0", 1)[0]
    if found.decode("utf-8", "replace") != name or octal(header[124:136]) != s["sizes"][0]:
        found = repr(found.decode("utf-8", "replace")) if found else "no tar header"
        return (f"shard {path} does not start with member {name} of {s['sizes'][0]} bytes as its "
                f"index says (found {found}); re-run make_shards.py")
    return None


class ShardImageFolder(Dataset):
    """ImageFolder-like dataset of one shard split: (transform(loader(Member)), target).

    `classes` restricts it to those class names (relabelled in that order), as
    util.datasets.SubsetImageFolder does. Each process opens a shard on first use and
    keeps up to max_open_shards() open, least recently used closed first; a forked
    DataLoader worker opens its own. Built on every rank at once (rank 0 checks the shards)."""

    def __init__(self, root, transform=None, classes=None, loader=None):
        # this process's open shards (least recently used first, at most max_open) and readers: see fd
        self.pid, self.fds, self.pool, self.max_open = None, OrderedDict(), None, MIN_OPEN
        self.fetched = {}  # index -> (its run's read under way, its place in the run), see prefetch
        index = load_index(root)
        self.root, self.transform, self.loader = root, transform, loader
        self.listed = index.get("listed", False) is True  # made from a file list or an unlabeled tree
        shards = index["shardlist"]
        self.paths = [os.path.join(root, s["url"]) for s in shards]
        self.check_shards(shards)
        col = lambda key, dtype: np.concatenate([np.asarray(s[key], dtype) for s in shards])
        shard_of = np.repeat(np.arange(len(shards)), [s["nsamples"] for s in shards])
        names = [n for s in shards for n in s["names"]]
        labels = col("labels", np.int64)
        self.classes = all_classes = index["classes"]
        rows = np.arange(len(names))
        if classes is not None:  # the ImageFolder order: sorted class names, relabelled
            missing = [c for c in classes if c not in all_classes]
            if missing:
                raise UserError(f"class subset names {len(missing)} classes not in {root}, e.g. {missing[0]}")
            new = np.full(len(all_classes), -1)
            new[[all_classes.index(c) for c in classes]] = np.arange(len(classes))
            rows = np.nonzero(new[labels] >= 0)[0]
            self.classes = list(classes)
        self.rows, self.shard_of, self.offsets, self.sizes = rows, shard_of, col("offsets", np.int64), col("sizes", np.int64)
        self.labels, self.names = labels, names
        self.targets = labels[rows].tolist() if classes is None else new[labels[rows]].tolist()
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples = [(names[r], t) for r, t in zip(rows, self.targets)]

    def subset(self, indices):
        """These samples only (a held-out split), in this order; it opens its own shards."""
        out = copy.copy(self)
        out.pid, out.fds, out.pool, out.fetched = None, OrderedDict(), None, {}  # opens its own
        out.rows = self.rows[np.asarray(indices, dtype=np.int64)]
        out.targets = [self.targets[i] for i in indices]
        out.samples = [self.samples[i] for i in indices]
        return out

    def unlabeled(self):
        """The same samples with label -1 and no classes (--labels none)."""
        out = self.subset(np.arange(len(self)))
        out.classes, out.class_to_idx, out.targets = [], {}, [-1] * len(self)
        out.samples = [(n, -1) for n, _ in self.samples]
        return out

    def check_shards(self, shards):
        """Fail now, on every rank with the same line, if a shard is missing, cut short or not
        the tar its index describes: rank 0 stats each and reads its first header (16 at a
        time), so the file system sees that once per shard, not once per rank."""
        fault = None
        if get_rank() == 0:
            with ThreadPoolExecutor(READERS) as pool:
                fault = next((f for f in pool.map(shard_fault, self.paths, shards) if f), None)
        fault = broadcast_object(fault)
        if fault:
            raise UserError(fault)

    def __len__(self):
        return len(self.rows)

    def mine(self):
        """A new (forked) worker drops its parent's descriptors, threads and reads under way,
        and takes its own limit of open shards."""
        if self.pid != os.getpid():
            self.close()
            self.pid, self.pool, self.fetched, self.max_open = os.getpid(), None, {}, max_open_shards()

    def settle(self):
        """Wait for the reads under way (their results stay in self.fetched)."""
        wait({pending for pending, _ in self.fetched.values()})

    def fd(self, shard):
        """The shard's descriptor, opened if it is not; past max_open, the least recently
        used one is closed first, once no read is under way."""
        self.mine()
        if shard in self.fds:
            self.fds.move_to_end(shard)
            return self.fds[shard]
        if len(self.fds) >= self.max_open:
            self.settle()
            os.close(self.fds.popitem(last=False)[1])
        try:
            self.fds[shard] = os.open(self.paths[shard], os.O_RDONLY)
        except OSError as e:
            raise UserError(f"cannot open shard {self.paths[shard]}: {e.strerror}"
                            + (" (raise `ulimit -n` or use bigger shards)" if e.errno == 24 else "")) from None
        return self.fds[shard]

    def span(self, i):
        """Where sample i's bytes are: (shard's descriptor, offset, length): the image, then
        the label member's header and data."""
        r = self.rows[i]
        want = padded(int(self.sizes[r])) + BLOCK + len(str(int(self.labels[r])))
        return self.fd(self.shard_of[r]), int(self.offsets[r]), want

    def prefetch(self, indices):
        """Start reading these samples' bytes, concurrently (os.pread releases the GIL): the
        batch in up to READERS runs of consecutive samples, a thread each (a thread per image
        costs ~60 us of handing over). The next read() of each sample waits for its run
        only, so the first sample decodes while the others still arrive. Replaces what an
        earlier prefetch left unread. A batch spread over more than max_open shards has its
        first samples, on max_open shards, read together, the rest one by one in read()."""
        self.mine()
        self.settle()  # an earlier batch's reads: done before fd() may close their shards
        self.fetched, shards = {}, set()
        for n, i in enumerate(indices):
            shards.add(self.shard_of[self.rows[i]])
            if len(shards) > self.max_open:  # fd() would close one of this batch's shards
                indices = indices[:n]
                break
        spans = [self.span(i) for i in indices]
        if self.pool is None:
            self.pool = ThreadPoolExecutor(READERS, thread_name_prefix="shard_read")
        run = -(-len(indices) // READERS)
        for first in range(0, len(indices), run):
            pending = self.pool.submit(lambda part: [os.pread(fd, n, at) for fd, at, n in part],
                                       spans[first:first + run])
            self.fetched.update((i, (pending, k)) for k, i in enumerate(indices[first:first + run]))

    def read(self, i):
        """Sample i's Member, from one read (os.pread, or prefetch's): the image, then the
        label member's header and data, which must name this sample and hold its label."""
        self.mine()
        pending, k = self.fetched.pop(i, (None, 0))
        if pending is not None:
            buf = pending.result()[k]
        else:
            fd, offset, want = self.span(i)
            buf = os.pread(fd, want, offset)
        r = self.rows[i]
        size, label = int(self.sizes[r]), int(self.labels[r])
        text = str(label).encode()
        want = padded(size) + BLOCK + len(text)
        if len(buf) < want:
            raise UserError(f"{self.where(r)}: truncated ({len(buf)} of {want} bytes)")
        header = buf[padded(size):padded(size) + BLOCK]  # the label member's: its name and size fields
        name, cls = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace"), f"{r:08d}.cls"
        if name != cls:
            raise UserError(f"{self.where(r)}: its label member {cls} is missing (found {name or 'no member'})")
        if octal(header[124:136]) != len(text) or buf[-len(text):] != text:
            raise UserError(f"{self.where(r)}: label in the shard differs from its index ({label})")
        return Member(buf[:size], lambda: f"{self.where(r)} ({self.names[r]})")

    def where(self, r):
        return f"shard {self.paths[self.shard_of[r]]}: member {member_names(r, self.names[r])[0]}"

    def __getitem__(self, i):
        sample = self.loader(self.read(i))
        if self.transform is not None:
            sample = self.transform(sample)
        return sample, self.targets[i]

    def __getitems__(self, indices):  # a batch of an evaluation loader: its reads together
        self.prefetch(indices)
        return [self[i] for i in indices]

    def close(self):
        if self.pool is not None and self.pid == os.getpid():
            self.pool.shutdown()
        for fd in self.fds.values():
            os.close(fd)
        self.fds, self.pool = OrderedDict(), None

    def __getstate__(self):  # a spawned worker opens its own shards and threads
        return {**self.__dict__, "pid": None, "fds": OrderedDict(), "pool": None, "fetched": {}}

    def __del__(self):
        if self.pid == os.getpid():
            self.close()
