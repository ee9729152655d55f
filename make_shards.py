"""Convert an ImageFolder root (train/ and val/), a folder of unlabeled images (--labels none)
or a file list into tar shards that every entry point reads with `--data_path SHARD_ROOT`
(the layout and the reader: util/shards.py).

    python make_shards.py --src /data/imagenet --dst /lustre/$USER/imagenet-shards
    python make_shards.py --src /data/imagenet --dst /lustre/$USER/imagenet-shards --verify_only
    python make_shards.py --src /data/photos --labels none --dst /lustre/$USER/photo-shards
    python make_shards.py --src /data/subset.txt --dst /lustre/$USER/subset-shards

An unlabeled tree without train/ and val/, or a file list, becomes one split, train/, in the
listing's order (util.sources: sorted files; the list's lines), names relative to --src (the
list's folder): training holds out val from it exactly as from the source itself.

Each image keeps its file's bytes, in the ImageFolder's order (sorted classes, then sorted
files). Interrupted, it resumes: a shard is written as NAME.tmp and renamed when complete,
the index is written last; a rerun keeps the finished shards that hold what the source says
(names, sizes, labels) and rewrites the rest. What a split was converted with (--shard_mb,
the source's listing) is recorded in SPLIT/make_shards.json before its first shard; a rerun
with other settings is refused, or with --rebuild starts the split over. --verify reads
every shard back and checks counts, labels and bytes against the source. Progress bars go
to stdout, errors to stderr.
"""
import argparse
import hashlib
import io
import json
import os
import sys
import tarfile

from torchvision import datasets
from tqdm import tqdm

from util.cli import add_bool
from util.errors import UserError, exit_on_user_error
from util.shards import (BLOCK, FORMAT, INDEX, SHARD_FILE, ShardImageFolder, load_index, member_names, padded,
                         read_bytes)
from util.sources import list_images, read_file_list

SETTINGS = "make_shards.json"  # beside index.json: what the split's shards were converted with


def get_args_parser():
    p = argparse.ArgumentParser("ImageFolder to tar shards", add_help=True)
    p.add_argument("--src", required=True, help="ImageFolder root with train/ and val/, a folder of images "
                   "(--labels none), or a file list (a text file: path [integer label] per line)")
    p.add_argument("--labels", default="folders", choices=["folders", "none"],
                   help="as main_pretrain's: folders = class folders give labels; none = every image below --src "
                   "(in train/ and val/ if it has them), label -1")
    p.add_argument("--dst", required=True, help="shard root to write (SHARD_ROOT/{train,val}/)")
    p.add_argument("--splits", nargs="+", default=["train", "val"])
    p.add_argument("--shard_mb", type=float, default=256, help="shard size in MB (a shard holds one image at least)")
    add_bool(p, "--rebuild", False, "when --dst holds a split converted with another --shard_mb or from another "
             "source, delete its shards and convert it again (default: refuse)")
    add_bool(p, "--verify", False, "after converting, read every shard back and compare with the source")
    add_bool(p, "--verify_only", False, "only verify an existing shard root against --src")
    return p


def source_samples(src, split, labels="folders"):
    """(split folder, classes, [(name relative to it, label)]): torchvision's ImageFolder order,
    or util.sources' listing of an unlabeled tree or a file list (label -1 when unlabeled)."""
    if os.path.isfile(src) or labels == "none":
        return listed_samples(src, split)
    root = os.path.join(src, split)
    if not os.path.isdir(root):
        raise UserError(f"{root} does not exist: --src must hold {split}/")
    try:
        folder = datasets.ImageFolder(root)
    except FileNotFoundError as e:  # no class folders, or a class folder without images
        raise UserError(f"{root}: {e} (images without class folders: use --labels none)") from None
    return root, folder.classes, [(os.path.relpath(p, root), t) for p, t in folder.samples]


def one_split(src):
    """Whether --src makes train/ alone: a file list, or a tree without train/ and val/."""
    return os.path.isfile(src) or not all(os.path.isdir(os.path.join(src, s)) for s in ("train", "val"))


def listed_samples(src, split):
    """source_samples of a file list or an unlabeled tree, as training lists it (util.sources)."""
    if os.path.isfile(src):
        root = os.path.dirname(os.path.abspath(src))
        paths, labels = read_file_list(src)
    else:
        root = src if one_split(src) else os.path.join(src, split)
        paths, labels = list_images(root), None
    classes = [] if labels is None else [str(c) for c in range(max(labels) + 1)]
    return root, classes, [(os.path.relpath(p, root), -1 if labels is None else t)
                           for p, t in zip(paths, labels or [None] * len(paths))]


def add_member(tar, name, raw):
    info = tarfile.TarInfo(name)  # fixed metadata: the same source gives the same bytes
    info.size, info.mode, info.mtime = len(raw), 0o444, 0
    tar.addfile(info, fileobj=io.BytesIO(raw))


def write_shard(path, root, samples, start, limit, bar):
    """Write samples[start:] into `path` until the next image would pass `limit` bytes;
    atomically (NAME.tmp, then renamed). Returns the end index and the images' sizes."""
    i, size, sizes = start, 0, []
    with open(path + ".tmp", "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            while i < len(samples):
                name, label = samples[i]
                try:
                    raw = read_bytes(os.path.join(root, name))
                except OSError as e:
                    raise UserError(f"cannot read {os.path.join(root, name)}: {e.strerror}") from None
                cost = 3 * BLOCK + padded(len(raw))  # two headers, the label's block, the image
                if i > start and size + cost > limit:
                    break
                image, cls = member_names(i, name)
                add_member(tar, image, raw)
                add_member(tar, cls, str(label).encode())
                size, i = size + cost, i + 1
                sizes.append(len(raw))
                bar.update(1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    return i, sizes


def scan_shard(path):
    """[(image member, data offset, size, label)] of a shard, read back with tarfile."""
    out = []
    try:
        with tarfile.open(path) as tar:
            members = tar.getmembers()
            for k, m in enumerate(members):
                if m.name.endswith(".cls"):
                    continue
                cls = os.path.splitext(m.name)[0] + ".cls"
                if k + 1 == len(members) or members[k + 1].name != cls:
                    raise UserError(f"shard {path}: member {m.name}: its label member {cls} is missing")
                out.append((m.name, m.offset_data, m.size, int(tar.extractfile(members[k + 1]).read())))
    except (tarfile.TarError, OSError, ValueError) as e:
        raise UserError(f"shard {path}: {e}") from None
    return out


def shard_entry(path, first, samples, size_of):
    """The index entry of a finished shard holding samples[first:...]; None when the shard
    does not hold what they say (names, labels, and size_of(j): the j-th one's file size)."""
    try:
        found = scan_shard(path)
    except UserError:
        return None
    part = samples[first:first + len(found)]
    want = [(member_names(first + j, n)[0], size_of(j), t) for j, (n, t) in enumerate(part)]
    if not found or [(m, s, t) for m, _, s, t in found] != want:
        return None
    return {"url": os.path.basename(path), "nsamples": len(found), "filesize": os.path.getsize(path),
            "first": first, "names": [n for n, _ in part], "labels": [t for _, t in part],
            "offsets": [o for _, o, _, _ in found], "sizes": [s for _, _, s, _ in found]}


def conversion(root, classes, samples, limit):
    """The settings a split's shards follow: shard size, and the source's listing (its
    classes and (name, label) list by hash; moved elsewhere, the same listing resumes)."""
    listing = hashlib.sha256(json.dumps([classes, samples]).encode()).hexdigest()
    return {"shard_bytes": limit, "source": os.path.abspath(root), "listing_sha256": listing,
            "images": len(samples), "classes": len(classes)}


def changes(earlier, now):
    """How the settings `now` differ from `earlier` ones, in words ([] if they do not)."""
    mb = lambda settings: f"{settings['shard_bytes'] / 2**20:.4g}"  # --shard_mb as given (the limit is whole bytes)
    out = []
    if earlier["shard_bytes"] != now["shard_bytes"]:
        out.append(f"--shard_mb {mb(earlier)} (this run: {mb(now)})")
    if earlier["listing_sha256"] != now["listing_sha256"]:
        out.append(f"another source, {earlier['images']} images in {earlier['classes']} classes of {earlier['source']} "
                   f"(this run: {now['images']} in {now['classes']} of {now['source']})")
    return out


def claim(out, settings, rebuild):
    """Record `settings` as those of the split folder `out`, after checking that the shards
    it holds were converted with the same ones (then a rerun resumes): other settings are
    refused, or with `rebuild` the split's shards and index are deleted."""
    found = [n for n in os.listdir(out) if SHARD_FILE.fullmatch(n) or n in (INDEX, INDEX + ".tmp")]
    try:
        with open(os.path.join(out, SETTINGS)) as f:
            earlier = json.load(f)
        diff = changes(earlier, settings)
    except (OSError, ValueError, TypeError, KeyError):  # none, or not one of ours
        earlier, diff = None, None
    if found and diff != []:
        if not rebuild:
            what = (f"was converted with {' and '.join(diff)}" if earlier is not None else
                    f"holds {len(found)} shard files but no readable {SETTINGS} (an older make_shards.py, or another "
                    "tool)")
            raise UserError(f"{out} {what}: pass --rebuild to replace its shards, or rerun with the earlier "
                            "settings to resume")
        for name in found:
            os.remove(os.path.join(out, name))
        print(f"{os.path.basename(out)}: --rebuild: removed the {len(found)} files of the earlier conversion")
    with open(os.path.join(out, SETTINGS + ".tmp"), "w") as f:
        json.dump(settings, f)
    os.replace(os.path.join(out, SETTINGS + ".tmp"), os.path.join(out, SETTINGS))


def convert_split(src, dst, split, limit, rebuild=False, labels="folders"):
    root, classes, samples = source_samples(src, split, labels)
    out = os.path.join(dst, split)
    os.makedirs(out, exist_ok=True)
    claim(out, conversion(root, classes, samples, limit), rebuild)
    if os.path.exists(os.path.join(out, INDEX)):
        os.remove(os.path.join(out, INDEX))  # the shards may change below; the index goes last
    shard = lambda k: os.path.join(out, f"{k:06d}.tar")
    shards, start = [], 0
    while start < len(samples) and os.path.exists(shard(len(shards))):  # resume: keep what is right
        size_of = lambda j: os.path.getsize(os.path.join(root, samples[start + j][0]))
        entry = shard_entry(shard(len(shards)), start, samples, size_of)
        if entry is None:
            break
        shards.append(entry)
        start += entry["nsamples"]
    for name in os.listdir(out):  # what is left of an earlier run past that point
        if name.endswith(".tmp") or (name.endswith(".tar") and name[:-4].isdigit() and int(name[:-4]) >= len(shards)):
            os.remove(os.path.join(out, name))
    if shards:
        print(f"{split}: keeping {len(shards)} finished shards ({start} images)")
    with tqdm(total=len(samples), initial=start, unit="img", desc=split, file=sys.stdout) as bar:
        while start < len(samples):
            path = shard(len(shards))
            end, sizes = write_shard(path, root, samples, start, limit, bar)
            entry = shard_entry(path, start, samples, sizes.__getitem__)
            if entry is None or entry["nsamples"] != end - start:
                raise UserError(f"shard {path} does not read back as written")
            shards.append(entry)
            start = end
    index = {"wids_version": 1, "name": split, "format": FORMAT, "classes": classes, "shardlist": shards}
    if os.path.isfile(src) or labels == "none":  # training decodes them as it does the source (util.sources.to_rgb)
        index["listed"] = True
    with open(os.path.join(out, INDEX + ".tmp"), "w") as f:
        json.dump(index, f)
    os.replace(os.path.join(out, INDEX + ".tmp"), os.path.join(out, INDEX))
    print(f"{split}: {len(samples)} images, {len(classes)} classes in {len(shards)} shards under {out}")


def verify_split(src, dst, split, labels="folders"):
    """Counts, classes, labels and every image's bytes of the shards against the source."""
    root, classes, samples = source_samples(src, split, labels)
    out = os.path.join(dst, split)
    if not os.path.isfile(os.path.join(out, INDEX)):
        raise UserError(f"{out} has no {INDEX}: not converted (or the conversion did not finish)")
    index = load_index(out)
    if index["classes"] != classes:
        raise UserError(f"{out}: classes differ from {root}")
    ds = ShardImageFolder(out, loader=read_bytes)  # checks each shard's size
    if len(ds) != len(samples):
        raise UserError(f"{out} holds {len(ds)} images, {root} {len(samples)}")
    for s in index["shardlist"]:  # the tar as other tools read it: no member more or less
        path = os.path.join(out, s["url"])
        found = [(o, n, t) for _, o, n, t in scan_shard(path)]
        if found != list(zip(s["offsets"], s["sizes"], s["labels"])):
            raise UserError(f"shard {path}: members differ from its index")
    for i in tqdm(range(len(ds)), unit="img", desc=f"verify {split}", file=sys.stdout):
        raw, label = ds[i]
        name, want = samples[i]
        if ds.names[i] != name or label != want:
            raise UserError(f"{ds.read(i)}: is {name} (label {want}) in {root}")
        if raw != read_bytes(os.path.join(root, name)):
            raise UserError(f"{ds.read(i)}: bytes differ from {os.path.join(root, name)}")
    print(f"verified {split}: {len(ds)} images in {len(index['shardlist'])} shards; counts, labels and bytes "
          f"match {root}")


@exit_on_user_error
def main(args):
    if args.shard_mb <= 0:
        raise UserError("--shard_mb must be positive")
    if not os.path.exists(args.src):
        raise UserError(f"--src {args.src} does not exist")
    splits = args.splits
    if (os.path.isfile(args.src) or args.labels == "none") and one_split(args.src):
        splits = ["train"]
        print(f"{args.src}: {'a file list' if os.path.isfile(args.src) else 'no train/ and val/'}: one split, train/ "
              "(training holds val out of it, --holdout)")
    for split in splits:
        if not args.verify_only:
            convert_split(args.src, args.dst, split, int(args.shard_mb * 2**20), args.rebuild, args.labels)
        if args.verify or args.verify_only:
            verify_split(args.src, args.dst, split, args.labels)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
