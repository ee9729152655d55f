"""Image sources without class folders: an unlabeled tree of images or a file list.

Both become ListedImages, a map-style dataset of (image, label) with label -1 when
unlabeled, so EpochSeeded / TrainSampler wrap it as they wrap an ImageFolder.
"""
import hashlib
import io
import os
import sys
import time
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from util.dist import broadcast_object, get_rank
from util.errors import BadImage, UserError
from util.shards import read_bytes

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
BACKGROUND = (255, 255, 255)  # alpha is composited on white (documented in PRETRAIN.md)
PIL_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb limit (Image.MAX_IMAGE_PIXELS), our default
# EXIF orientation (tag 0x0112) -> the transpose that shows the image upright: PIL's
# ImageOps.exif_transpose table, used for PIL images and decoded arrays alike
ORIENT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
          5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
          8: Image.Transpose.ROTATE_90}


def is_image_name(name):
    return name.lower().endswith(IMAGE_EXTS)


def list_images(root, progress_s=10.0, out=sys.stdout):
    """Every image file below `root` (any nesting), sorted, so every rank and restart
    sees the same order. On a slow file system a running count every `progress_s` seconds
    says the walk is alive; the end says how long it took."""
    found, folders, t0 = [], 0, time.monotonic()
    last, seen, again = t0, set(), 0
    for folder, dirs, files in os.walk(root, followlinks=True):
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:  # reached again through a link (a loop: every file many times)
            dirs[:], again = [], again + 1
            continue
        seen.add((st.st_dev, st.st_ino))
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
    links = f" ({again:,} folders reached again through links: listed once)" if again else ""
    print(f"listed {len(found):,} images in {folders:,} folders below {root} in {time.monotonic() - t0:.1f} s{links}",
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


_DUPLICATES_SAID = set()  # file lists whose repeated lines were reported


def read_file_list(path):
    """(paths, labels) from a text file: one path per line (spaces allowed), relative to the
    list's folder or absolute, optionally followed by whitespace and an integer label (all
    lines or none). A file named twice (joined lists) is kept once: twice, it could land in
    both the training and the held-out split."""
    base = os.path.dirname(os.path.abspath(path))
    first, repeats = {}, 0  # normalised path -> (line number, label)
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.rsplit(None, 1)
            has_label = len(parts) == 2 and parts[1].lstrip("-").isdigit()
            name, label = (parts[0], int(parts[1])) if has_label else (line, None)
            key = os.path.normpath(os.path.join(base, name))
            if len(parts) == 2 and not has_label and not os.path.exists(key):  # a stat for spaced lines only
                raise UserError(f"{path}:{n}: expected 'path [integer label]', got {line!r} (no such file)")
            if key in first and first[key][1] != label:
                raise UserError(f"{path}:{n}: {name} is listed again with another label (line {first[key][0]})")
            repeats += key in first
            first.setdefault(key, (n, label))
    if not first:
        raise UserError(f"file list {path} names no files")
    paths, labels = list(first), [label for _, label in first.values()]
    if len({lab is None for lab in labels}) > 1:
        raise UserError(f"file list {path}: some lines have a label and some do not")
    if repeats and path not in _DUPLICATES_SAID:
        _DUPLICATES_SAID.add(path)
        print(f"note: file list {path} names {repeats:,} files again: each is kept once")
    return paths, None if labels[0] is None else labels


def holdout_split(names, fraction, seed=0, max_held=5000):
    """(train_idx, held_idx): a fixed-seed permutation of the sorted names, so the split
    depends only on which files are listed, never on their order in a file list (a `find`
    on another machine), the world size or a resume."""
    n = len(names)
    held = min(max(1, round(n * fraction)), max_held, n - 1)
    if held < 1:
        raise UserError(f"--holdout needs at least 2 images, found {n}")
    by_name = sorted(range(n), key=names.__getitem__)
    order = [by_name[i] for i in np.random.default_rng(seed).permutation(n)]
    return sorted(order[held:]), sorted(order[:held])


def names_digest(names):
    """Short sha256 of the names (in the order given), printed at start so two runs can be seen to agree."""
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


def orient_pixels(pixels, orientation):
    """An (H, W, C) uint8 array turned upright as ORIENT says (by PIL, the same rule as images)."""
    if orientation not in ORIENT:
        return pixels
    grey = pixels.shape[-1] == 1
    out = np.array(Image.fromarray(pixels[..., 0] if grey else pixels).transpose(ORIENT[orientation]))
    return out[..., None] if grey else out


def unreadable(path, e):
    """The one-line BadImage of every decode path for an image that failed with `e`."""
    if isinstance(e, UnidentifiedImageError):  # its text names a BytesIO object, not the file
        e = "not an image file PIL can identify"
    return BadImage(f"cannot read image {path}: {e}")


class ImageReader:
    """The one rule by which every loader (plain PIL, util.jpeg.DecodeCrop, util.gpu_aug
    read_encoded; files or shard members) turns a file into 8-bit RGB.

    any_mode: to_rgb (unlabeled trees, file lists); False: PIL's convert('RGB'), which an
    ImageFolder root has always had (the same pixels for ImageNet's RGB/grey/CMYK JPEGs).
    exif_transpose: EXIF orientation applied (off by default: it changes ImageNet's pixels).
    max_pixels: PIL's decompression-bomb limit (0: none); over it one warning line, over
    twice it (where PIL refuses) an error naming the file and --max_image_pixels."""

    def __init__(self, any_mode=True, exif_transpose=False, max_pixels=PIL_MAX_PIXELS):
        self.any_mode, self.exif_transpose, self.max_pixels = any_mode, exif_transpose, max_pixels
        self.warned = set()

    def check_size(self, width, height, name):
        if not self.max_pixels or width * height <= self.max_pixels:
            return
        if width * height > 2 * self.max_pixels:
            raise BadImage(f"cannot read image {name}: {width}x{height} pixels, over twice PIL's decompression-bomb "
                           f"limit of {self.max_pixels:,}; raise it with --max_image_pixels N (0: no limit) "
                           "if you trust the file")
        if name not in self.warned:
            self.warned.add(name)
            print(f"warning: {name}: {width}x{height} pixels, over PIL's decompression-bomb limit of "
                  f"{self.max_pixels:,} (decoded anyway; refused over twice it; --max_image_pixels)",
                  file=sys.stderr, flush=True)

    def open(self, raw, name):
        """The PIL image of `raw` (header read only), its size checked."""
        Image.MAX_IMAGE_PIXELS = 2 * self.max_pixels or None  # this process's PIL: check_size says the rest
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw))
        self.check_size(img.width, img.height, name)
        return img

    def orientation(self, img):
        """EXIF orientation of a PIL image, 1 (as stored) unless --exif_transpose."""
        return img.getexif().get(0x0112, 1) if self.exif_transpose else 1

    def rgb(self, img):
        """8-bit RGB, upright where asked."""
        turn = self.orientation(img)
        img = to_rgb(img) if self.any_mode else img.convert("RGB")
        return img.transpose(ORIENT[turn]) if turn in ORIENT else img

    def __call__(self, path):
        """Loader: the RGB PIL image of a file or a util.shards.Member; a failure names it (one line)."""
        try:
            return self.rgb(self.open(read_bytes(path), path))
        except BadImage:
            raise
        except Exception as e:  # truncated, not an image, unreadable
            raise unreadable(path, e) from None

    def using(self, reader):
        return reader


any_mode_loader = ImageReader()


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
