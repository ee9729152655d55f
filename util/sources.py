"""Image sources without class folders: an unlabeled tree of images or a file list.

Both become ListedImages, a map-style dataset of (image, label) with label -1 when
unlabeled, so EpochSeeded / TrainSampler wrap it as they wrap an ImageFolder.
"""
import hashlib
import io
import os
import sys
import time

import numpy as np
from PIL import Image

from util.dist import broadcast_object, get_rank
from util.errors import UserError
from util.shards import read_bytes

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
BACKGROUND = (255, 255, 255)  # alpha is composited on white (documented in PRETRAIN.md)


def is_image_name(name):
    return name.lower().endswith(IMAGE_EXTS)


def list_images(root, progress_s=10.0, out=sys.stdout):
    """Every image file below `root` (any nesting), sorted, so every rank and restart
    sees the same order. On a slow file system a running count every `progress_s` seconds
    says the walk is alive; the end says how long it took."""
    found, folders, t0 = [], 0, time.monotonic()
    last = t0
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs.sort()
        folders += 1
        found.extend(os.path.join(folder, f) for f in files if is_image_name(f))
        if time.monotonic() - last >= progress_s:
            last = time.monotonic()
            print(f"listing {root}: {len(found):,} images in {folders:,} folders so far ({last - t0:.0f} s)",
                  file=out, flush=True)
    if not found:
        raise UserError(f"no image files ({', '.join(IMAGE_EXTS)}) below {root}")
    found.sort()
    print(f"listed {len(found):,} images in {folders:,} folders below {root} in {time.monotonic() - t0:.1f} s",
          file=out, flush=True)
    return found


_LISTED = {}  # root -> its listing, for the rest of the process


def shared_list_images(root):
    """list_images(root) walked by rank 0 alone and sent to the other ranks (one broadcast
    of the names relative to root): on a network file system every rank walking millions
    of files is slow, and ranks that saw the tree at different moments would disagree.
    Kept for the process, so the train and val splits come from the same listing. A
    failure on rank 0 is the same one line on every rank, not a hang."""
    key = os.path.abspath(root)
    if key not in _LISTED:
        prefix = os.path.join(root, "")  # os.walk's paths all start with it
        reply = None
        if get_rank() == 0:
            try:
                reply = [p[len(prefix):] for p in list_images(root)]
            except UserError as e:
                reply = e
        reply = broadcast_object(reply)
        if isinstance(reply, UserError):
            raise reply
        _LISTED[key] = [prefix + name for name in reply]
    return list(_LISTED[key])


def read_file_list(path):
    """(paths, labels) from a text file: one path per line, relative to the list's folder
    or absolute, optional second column an integer label (all lines or none)."""
    base = os.path.dirname(os.path.abspath(path))
    paths, labels = [], []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) > 2 or (len(parts) == 2 and not parts[1].lstrip("-").isdigit()):
                raise UserError(f"{path}:{n}: expected 'path [integer label]', got {line.strip()!r}")
            paths.append(os.path.join(base, parts[0]))
            labels.append(int(parts[1]) if len(parts) == 2 else None)
    if not paths:
        raise UserError(f"file list {path} names no files")
    if len({lab is None for lab in labels}) > 1:
        raise UserError(f"file list {path}: some lines have a label and some do not")
    return paths, None if labels[0] is None else labels


def holdout_split(names, fraction, seed=0, max_held=5000):
    """(train_idx, held_idx): a fixed-seed permutation of the sorted names, so the split
    depends only on the file list, never on world size or resume."""
    n = len(names)
    held = min(max(1, round(n * fraction)), max_held, n - 1)
    if held < 1:
        raise UserError(f"--holdout needs at least 2 images, found {n}")
    order = np.random.default_rng(seed).permutation(n)
    return sorted(order[held:].tolist()), sorted(order[:held].tolist())


def names_digest(names):
    """Short sha256 of the names, printed at start so two runs can be seen to agree."""
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:12]


def to_rgb(img):
    """8-bit RGB from any PIL mode: 16/32-bit grey scaled (convert('RGB') would clip),
    alpha and palette transparency composited on BACKGROUND, CMYK/grey converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a * 255.0 / top + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGBA")
        canvas = Image.new("RGB", img.size, BACKGROUND)
        canvas.paste(img, mask=img.getchannel("A"))
        return canvas
    return img.convert("RGB")


def any_mode_loader(path):
    try:
        return to_rgb(Image.open(io.BytesIO(read_bytes(path))))
    except Exception as e:  # truncated, not an image, unreadable
        raise UserError(f"cannot read image {path}: {e}") from None


class ListedImages:
    """Map-style dataset over listed files; label -1 where unlabeled."""

    def __init__(self, paths, labels=None, transform=None, loader=None):
        self.samples = [(p, -1 if labels is None else labels[i]) for i, p in enumerate(paths)]
        self.targets = [t for _, t in self.samples]
        # labels 0..max as classes, like ImageFolder; none when unlabeled
        self.classes = [] if labels is None else list(range(max(labels) + 1))
        self.transform, self.loader = transform, loader or any_mode_loader

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, target = self.samples[index]
        img = self.loader(path)
        return (self.transform(img) if self.transform else img), target

    def subset(self, indices):
        picked = [self.samples[i] for i in indices]
        out = ListedImages([p for p, _ in picked], [t for _, t in picked], self.transform, self.loader)
        return out
