"""Datasets, transforms and loaders shared by pretraining and evaluation.

Sources: an ImageFolder root `data_path/{train,val}` (optionally restricted to
the classes listed in a file, one wnid per line, ImageNet-100 style), or the same
converted to tar shards by make_shards.py (util.shards, recognised by its index),
CIFAR-10/100 from torchvision's local files (never downloaded), and a built-in
synthetic labelled set used when no data path is given.
"""
import math
import multiprocessing
import os
import random
import sys

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torchvision import datasets, transforms
from torchvision.transforms import functional as F

from util.dist import all_gather_object, all_reduce_sum, get_rank, get_world_size
from util.errors import BadImage, UserError
from util.preempt import LoaderWorkerSignals
from util.jpeg import DecodeCrop
from util.sources import (PIL_MAX_PIXELS, ImageReader, ListedImages, holdout_split, names_digest, read_file_list,
                          shared_list_images)
from util.shards import ShardImageFolder, is_shard_split, read_bytes, unfinished_conversion

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---- transforms ---------------------------------------------------------------
def pretrain_transform(input_size):
    """MAE's pretraining augmentation."""
    return transforms.Compose([
        transforms.RandomResizedCrop(input_size, scale=(0.2, 1.0),
                                     interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def eval_resize(input_size):
    """MAE's evaluation resize: crop_pct 224/256 up to 224 px (224 -> 256), 1.0 above (384 -> 384)."""
    crop_pct = 224 / 256 if input_size <= 224 else 1.0
    return int(input_size / crop_pct)


def eval_transform(input_size):
    """Resize (eval_resize) and centre-crop, as MAE's evaluation."""
    return transforms.Compose([
        transforms.Resize(eval_resize(input_size), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(input_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class MAERandomResizedCrop(transforms.RandomResizedCrop):
    """MAE's RandomResizedCrop (its util/crop.py, after BYOL's TF code), used by its
    linear probe: one draw of area and log-aspect ratio, the box clamped to the
    image, no 10-try rejection loop. Its boxes are larger on average than
    torchvision's (mean area 0.52 vs 0.44 of a 500x375 image at scale 0.08-1)."""

    @staticmethod
    def get_params(img, scale, ratio):
        width, height = F.get_image_size(img)
        target_area = height * width * torch.empty(1).uniform_(scale[0], scale[1]).item()
        log_ratio = torch.log(torch.tensor(ratio))
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        w = min(int(round(math.sqrt(target_area * aspect_ratio))), width)
        h = min(int(round(math.sqrt(target_area / aspect_ratio))), height)
        i = torch.randint(0, height - h + 1, size=(1,)).item()
        j = torch.randint(0, width - w + 1, size=(1,)).item()
        return i, j, h, w


# ---- sources -----------------------------------------------------------------
# PIL loader (of a file or a util.shards.Member) whose failure names it (one line): an
# ImageFolder's, convert('RGB') as it always was; build_dataset swaps in the source's reader
checked_loader = ImageReader(any_mode=False)


def image_reader(args, listed=False):
    """The util.sources.ImageReader of the source in `args`, shared by every decode path:
    to_rgb for unlabeled trees and file lists (`listed`: shards made from them), an
    ImageFolder's convert('RGB') otherwise; --exif_transpose, --max_image_pixels."""
    path = args.data_path
    listed = listed or path is not None and (os.path.isfile(path) or getattr(args, "labels", "folders") == "none")
    return ImageReader(any_mode=listed, exif_transpose=getattr(args, "exif_transpose", False),
                       max_pixels=getattr(args, "max_image_pixels", PIL_MAX_PIXELS))


def with_reader(loader, reader):
    """`loader` (None: the reader itself) decoding by `reader`'s rules, where it takes them."""
    return reader if loader is None else loader.using(reader) if hasattr(loader, "using") else loader


class SubsetImageFolder(datasets.ImageFolder):
    """ImageFolder restricted to the class folders named in `classes` (if given)."""

    def __init__(self, root, transform=None, classes=None, loader=None):
        self.wanted = classes
        super().__init__(root, transform=transform, loader=loader or checked_loader)

    def find_classes(self, directory):
        found, _ = super().find_classes(directory)
        if self.wanted is None:
            return found, {c: i for i, c in enumerate(found)}
        missing = [c for c in self.wanted if c not in found]
        if missing:
            raise UserError(f"class subset names {len(missing)} classes not in {directory}, "
                            f"e.g. {missing[0]}")
        return list(self.wanted), {c: i for i, c in enumerate(self.wanted)}


def read_class_subset(path):
    if path is None:
        return None
    if not os.path.isfile(path):
        raise UserError(f"class subset file {path} does not exist")
    with open(path) as f:
        wnids = [line.split()[0] for line in f if line.strip() and not line.startswith("#")]
    if not wnids:
        raise UserError(f"class subset file {path} lists no classes")
    return wnids


class SyntheticImages(Dataset):
    """Deterministic labelled images generated on the fly, no files needed.

    Each class has its own pair of colours and a stripe orientation and frequency;
    every sample draws its own phase, contrast, shift and pixel noise from a
    generator seeded by (seed, split, index). A linear probe on any reasonable
    features can therefore beat chance, and the same index always gives the same
    image on every rank and every run.
    """

    def __init__(self, num_samples, nb_classes=10, image_size=64, split="train", seed=0,
                 transform=None):
        self.num_samples, self.nb_classes, self.image_size = num_samples, nb_classes, image_size
        self.seed, self.split_id, self.transform = seed, 0 if split == "train" else 1, transform
        self.classes = [f"class_{i}" for i in range(nb_classes)]
        g = np.random.default_rng(seed + 12345)
        self.colors = g.uniform(0, 1, size=(nb_classes, 2, 3))
        self.angles = g.uniform(0, np.pi, size=nb_classes)
        self.freqs = g.uniform(1.5, 5.0, size=nb_classes)
        self.targets = [i % nb_classes for i in range(num_samples)]

    def __len__(self):
        return self.num_samples

    def render(self, index):
        c = self.targets[index]
        g = np.random.default_rng([self.seed, self.split_id, index])
        s = self.image_size
        y, x = np.mgrid[0:s, 0:s] / s
        angle = self.angles[c] + g.normal(0, 0.15)
        proj = x * np.cos(angle) + y * np.sin(angle) + g.uniform(0, 1)
        wave = 0.5 + 0.5 * g.uniform(0.6, 1.0) * np.sin(2 * np.pi * self.freqs[c] * proj)
        img = wave[..., None] * self.colors[c, 0] + (1 - wave[..., None]) * self.colors[c, 1]
        img = img + g.normal(0, 0.08, size=img.shape)
        return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))

    def __getitem__(self, index):
        img = self.render(index)
        return (self.transform(img) if self.transform else img), self.targets[index]


def source_kind(args):
    return args.dataset or ("synthetic" if args.data_path is None else "imagefolder")


def build_dataset(args, split, transform, loader=None):
    """split: 'train' or 'val'. Chooses the source from args.dataset / args.data_path.
    `loader` replaces the ImageFolder's file loader (util.gpu_aug.read_encoded)."""
    kind = source_kind(args)
    if kind == "imagefolder" and args.data_path is not None and is_shard_split(os.path.join(args.data_path, "train")):
        return build_shards(args, split, transform, loader)
    if kind == "imagefolder":  # every decode path with the source's rules (util.sources.ImageReader)
        loader = with_reader(loader, image_reader(args))
    if kind == "synthetic":
        n = args.synthetic_size if split == "train" else max(args.synthetic_size // 4, 1)
        return SyntheticImages(n, args.nb_classes or 10, args.input_size, split, args.seed, transform)
    if kind == "imagefolder" and args.data_path is not None and (
            os.path.isfile(args.data_path) or getattr(args, "labels", "folders") == "none"):
        return build_listed(args, split, transform, loader)
    if args.data_path is None or not os.path.isdir(args.data_path):
        raise UserError(f"data_path {args.data_path} does not exist or is not a folder")
    if kind in ("cifar10", "cifar100"):
        cls = datasets.CIFAR10 if kind == "cifar10" else datasets.CIFAR100
        try:
            return cls(args.data_path, train=split == "train", transform=transform, download=False)
        except RuntimeError as e:
            raise UserError(f"{kind} files not found under {args.data_path} ({e}); "
                            "place torchvision's extracted archive there") from None
    if kind != "imagefolder":
        raise UserError(f"unknown dataset {kind!r}")
    root = os.path.join(args.data_path, split)
    if not os.path.isdir(root):
        raise UserError(f"{root} does not exist: data_path must hold train/ and val/ class folders "
                        "(images without class folders: use --labels none)")
    try:
        return SubsetImageFolder(root, transform, read_class_subset(args.class_subset), loader)
    except FileNotFoundError as e:  # no class folders (tar shards without an index?), or a class folder without images
        raise UserError(unfinished_conversion(root) or f"{root}: {e} (images without class folders: "
                        "use --labels none)") from None


_ANNOUNCED = set()  # held-out splits already described in this process


def build_listed(args, split, transform, loader=None):
    """A file list or an unlabeled tree (util.sources). Without val/, `split` is a
    fixed-seed held-out part of the sorted list, the same at every world size."""
    path = args.data_path
    has_splits = all(os.path.isdir(os.path.join(path, s)) for s in ("train", "val"))
    if os.path.isfile(path):
        paths, labels = read_file_list(path)
        if getattr(args, "labels", "folders") == "none" and labels is not None:  # the user said: no labels
            if split == "train":
                print(f"--labels none: the labels of {path} are not used")
            labels = None
    elif has_splits:
        return ListedImages(shared_list_images(os.path.join(path, split)), None, transform, loader)
    else:
        paths, labels = shared_list_images(path), None
    base = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))  # digest not tied to the mount
    train, held = held_out(args, path, [os.path.relpath(p, base) for p in paths])
    return ListedImages(paths, labels, transform, loader).subset(train if split == "train" else held)


def held_out(args, source, names):
    """(train, held) indices of the sorted names (util.sources.holdout_split), stated once per
    source, whichever split is built first (main_analyze builds val alone)."""
    train, held = holdout_split(names, args.holdout)
    if source not in _ANNOUNCED:
        _ANNOUNCED.add(source)
        print(f"held out {len(held)} of {len(names)} images for val "
              f"(sha256 of their names {names_digest(sorted(names[i] for i in held))})")
    return train, held


def build_shards(args, split, transform, loader):
    """A make_shards.py root: train/ and val/ as converted, or train/ alone (shards of a file
    list or of a tree without val/), whose val is held out as build_listed does; the names
    are those of the source, so the split and its digest are the source's. --labels none:
    label -1 throughout; shards of an unlabeled source need it."""
    path, unlabeled = args.data_path, getattr(args, "labels", "folders") == "none"
    has_val = is_shard_split(os.path.join(path, "val"))
    root = os.path.join(path, split if has_val else "train")
    ds = ShardImageFolder(root, transform, read_class_subset(args.class_subset))
    ds.loader = with_reader(loader, image_reader(args, listed=ds.listed))
    if unlabeled:
        ds = ds.unlabeled()
    elif not ds.classes:
        raise UserError(f"{root}: shards of an unlabeled source (no classes): use --labels none")
    if has_val:
        return ds
    train, held = held_out(args, root, [n for n, _ in ds.samples])
    return ds.subset(train if split == "train" else held)


def build_train_set(args, transform):
    """The training set for `transform`, a Compose whose first step is a random resized crop.

    With --fast_decode (the default) and image files, that crop moves into the file loader
    (util.jpeg.DecodeCrop: libjpeg-turbo, box first, one vectorised resize), and when only
    flips stand between it and a closing ToTensor + Normalize, those two are left to the
    device: the workers send uint8 batches, 4x smaller. Returns (dataset, normalize):
    normalize is (mean, std) for on_device, or None when the batches are already final."""
    crop, *rest = transform.transforms
    if not (args.fast_decode and source_kind(args) == "imagefolder" and DecodeCrop.supports(crop)):
        return build_dataset(args, "train", transform), None
    normalize = None
    if len(rest) >= 2 and isinstance(rest[-2], transforms.ToTensor) \
            and isinstance(rest[-1], transforms.Normalize) \
            and all(isinstance(t, transforms.RandomHorizontalFlip) for t in rest[:-2]):
        normalize, rest = (rest[-1].mean, rest[-1].std), rest[:-2]
    loader = DecodeCrop(crop, pil=normalize is None)
    return build_dataset(args, "train", transforms.Compose(rest), loader=loader), normalize


def num_classes_of(dataset):
    return len(dataset.classes)


def class_names(dataset):
    """The class names by label index, as a plain list of str (ImageFolder's folder names, a
    shard index's classes, torchvision's CIFAR names, SyntheticImages' class_i), or None
    where the classes are bare label numbers (a labelled file list): numbers are no names."""
    names = list(getattr(dataset, "classes", None) or [])
    return [str(n) for n in names] if names and all(isinstance(n, str) for n in names) else None


def class_difference(a, b, in_a, in_b):
    """Where two class-name lists first differ ("label i is 'x' in <in_a>, 'y' in <in_b>",
    and "(n vs m classes)" when the counts differ), or "" when they agree or either has no names: the one check behind
    check_same_classes and a resumed checkpoint's classes (util.checkpoint)."""
    if not a or not b or list(a) == list(b):
        return ""
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    name = lambda names: repr(names[i]) if i < len(names) else "missing"
    counts = f" ({len(a)} vs {len(b)} classes)" if len(a) != len(b) else ""
    return f"label {i} is {name(a)} in {in_a}, {name(b)} in {in_b}{counts}"


def check_same_classes(train, val, what="the val split"):
    """Fail unless `val`'s labels mean what `train`'s do: equal counts are not enough (train
    a, b, c and val a, b, d: label 2 is c in one and d in the other, and accuracy is silently
    wrong). Datasets without names (file lists' bare numbers) are not checked."""
    diff = class_difference(class_names(train), class_names(val), "train", "val")
    if diff:
        raise UserError(f"{what}'s classes differ from the train split's: {diff}")


def train_source(loader):
    """The dataset under a train_loader (or a wrapper with a .loader)."""
    while not isinstance(loader, DataLoader):
        loader = loader.loader
    return loader.dataset.dataset  # inside EpochSeeded


def check_nb_classes(args, dataset):
    """Fill args.nb_classes from the dataset, or fail if the user's value differs."""
    n = num_classes_of(dataset)
    if args.nb_classes is not None and args.nb_classes != n:
        raise UserError(f"--nb_classes {args.nb_classes} but the dataset has {n} classes")
    args.nb_classes = n


# ---- samplers and loaders -------------------------------------------------------
class ShardSampler(Sampler):
    """Each rank takes indices rank, rank+W, ...: no padding, no duplicates, so
    summed counts over ranks equal a one-process evaluation exactly."""

    def __init__(self, dataset):
        self.indices = range(get_rank(), len(dataset), get_world_size())

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def train_loader(dataset, args, seed, collate_fn=None, mask_patches=0):
    """Shuffled, rank-sharded loader of whole accumulation groups (TrainSampler: the epoch's
    leftover samples short of an effective batch are dropped, as MAE), with augmentation
    seeded per (epoch, sample); call loader.sampler.set_epoch. With mask_patches, each
    batch also holds every sample's mask noise (EpochSeeded)."""
    accum = getattr(args, "accum_iter", 1)
    sampler = TrainSampler(dataset, args.batch_size, seed, accum)
    if mask_patches and collate_fn is not None:
        collate_fn = NoiseLast(collate_fn)
    # The loader's own generator: creating an iterator then draws nothing from the
    # global RNG, so a resumed run's random draws match.
    skip_bad = getattr(args, "skip_bad_images", False)
    loader = DataLoader(EpochSeeded(dataset, seed, mask_patches, skip_bad), sampler=sampler, batch_size=args.batch_size,
                        num_workers=args.num_workers, pin_memory=args.pin_mem, drop_last=True,
                        persistent_workers=args.num_workers > 0, collate_fn=collate_fn,
                        generator=torch.Generator().manual_seed(seed), worker_init_fn=LoaderWorkerSignals())
    if len(loader) == 0:
        world = get_world_size()
        raise UserError(f"the training set has {len(dataset)} images, fewer than one effective batch of "
                        f"{args.batch_size * accum * world} (--batch_size {args.batch_size} x --accum_iter {accum} "
                        f"x {world} processes): no update could run; lower --batch_size or --accum_iter")
    return loader


class NoiseLast:
    """A collate_fn for (..., mask noise) samples: `collate` on the rest, the noise stacked after."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, batch):
        return (*self.collate([b[:-1] for b in batch]), torch.stack([b[-1] for b in batch]))


class NormalizeOnDevice:
    """Wraps a loader of uint8 image batches: yields (float32 batch on `device`, normalised
    with mean/std as ToTensor + Normalize would, targets). Keeps the wrapped loader's
    sampler and length (set_epoch, mid-epoch resume)."""

    def __init__(self, loader, device, mean, std):
        self.loader, self.device, self.sampler = loader, torch.device(device), loader.sampler
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1) * 255

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for images, *rest in self.loader:  # rest: targets (and mask seeds)
            images = images.to(self.device, non_blocking=True)
            yield (images.float() - self.mean) / self.std, *rest


def skipped_images(loader):
    """Training samples replaced since the last call (--skip_bad_images), summed over ranks;
    call on every rank. `loader`: train_loader's, or a wrapper with a .loader."""
    while not isinstance(loader, DataLoader):
        loader = loader.loader
    counter = loader.dataset.skipped
    with counter.get_lock():  # the workers are idle between epochs: nothing is lost
        n, counter.value = counter.value, 0
    return int(all_reduce_sum(torch.tensor(n)).item())


def on_device(loader, normalize, device):
    """The loader as build_train_set's `normalize` asks: unchanged, or NormalizeOnDevice."""
    return loader if normalize is None else NormalizeOnDevice(loader, device, *normalize)


def eval_loader(dataset, args, batch_size=None):
    """In-order, rank-sharded loader of a whole evaluation set. Its own generator (the eval
    transforms draw nothing): an iterator's base seed then comes from it, not from the global
    RNG, so monitoring leaves a training run's RNG stream as it was."""
    return DataLoader(dataset, sampler=ShardSampler(dataset), batch_size=batch_size or args.batch_size,
                      num_workers=args.num_workers, pin_memory=args.pin_mem, drop_last=False,
                      generator=torch.Generator().manual_seed(0), worker_init_fn=LoaderWorkerSignals())


class ReadCheck(Dataset):
    """Index i -> None where dataset[i] reads, else (i, the BadImage's line): readable_subset's scan."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        try:
            self.dataset[i]
        except BadImage as e:
            return i, str(e)
        return None


def bad_only(batch):
    """ReadCheck's collate_fn: the unreadable samples of the batch."""
    return [b for b in batch if b is not None]


class KeptSubset(Subset):
    """A Subset keeping the classes and (its samples') targets that the monitors read."""

    def __init__(self, dataset, indices):
        super().__init__(dataset, indices)
        self.classes = getattr(dataset, "classes", None)
        if getattr(dataset, "targets", None) is not None:
            self.targets = [dataset.targets[i] for i in indices]


def readable_subset(dataset, args, what="val"):
    """--skip_bad_images for an evaluation set: one pass (rank-sharded, gathered) finds the
    unreadable images, which are then left out of every evaluation, not replaced: a replacement
    would count one image twice in the metrics. Said once; `dataset` itself when all read."""
    loader = DataLoader(ReadCheck(dataset), sampler=ShardSampler(dataset), batch_size=args.batch_size,
                        num_workers=args.num_workers, collate_fn=bad_only, worker_init_fn=LoaderWorkerSignals(),
                        generator=torch.Generator().manual_seed(0))  # the run's RNG stays as without the flag
    mine = [b for batch in loader for b in batch]
    bad = sorted(b for rank in all_gather_object(mine) for b in rank)
    if not bad:
        return dataset
    if len(bad) == len(dataset):
        raise UserError(f"--skip_bad_images: no image of the {len(dataset)} {what} images could be read")
    print(f"skipped {len(bad)} unreadable {what} images of {len(dataset)} (--skip_bad_images), left out of "
          f"every evaluation: first {bad[0][1]}")
    gone = {i for i, _ in bad}
    return KeptSubset(dataset, [i for i in range(len(dataset)) if i not in gone])


# ---- reproducible augmentation and masks ----------------------------------------------
class EpochSeeded(Dataset):
    """Draws each sample's augmentation from a generator seeded by (seed, epoch, index).

    Indexed by (epoch, index) pairs from TrainSampler. The augmentation is then the
    same whatever the number of workers or ranks, and a run resumed mid-epoch sees
    exactly the crops an uninterrupted run would. The caller's RNG states are restored.
    With mask_patches, a sample is (image, target, mask noise): mask_noise from a second
    word of the same seed sequence, so the mask too follows the sample, not the rank.
    """

    def __init__(self, dataset, seed, mask_patches=0, skip_bad=False):
        self.dataset, self.seed, self.mask_patches = dataset, seed, mask_patches
        self.classes = getattr(dataset, "classes", None)
        # --skip_bad_images: samples replaced, counted across the loader's worker processes
        self.skipped = multiprocessing.Value("q", 0) if skip_bad else None

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        """Sample (epoch, index); with skip_bad, an unreadable image's sample is the next
        readable index's (its own seed too): the same replacement at any world size, on resume."""
        epoch, index = key
        for step in range(len(self.dataset)):
            try:
                return self.sample(epoch, (index + step) % len(self.dataset))
            except BadImage as e:
                if self.skipped is None:
                    raise
                if step == 0:  # counted once per sample (a bad replacement counts as its own sample)
                    with self.skipped.get_lock():
                        self.skipped.value += 1
                    # every rank's own line (print is rank 0's only, util.dist)
                    sys.stderr.write(f"skipped (--skip_bad_images): {e}\n")
        raise UserError(f"--skip_bad_images: no image of the {len(self.dataset)} could be read")

    def sample(self, epoch, index):
        s, mask_seed = (int(x) for x in np.random.SeedSequence([self.seed, epoch, index]).generate_state(2))
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):  # saves and restores the CPU generator only
            # so seed that one alone: torch.manual_seed would reseed every CUDA generator too
            # (drop path, masks drawn on the GPU), unrestored, with --num_workers 0
            torch.default_generator.manual_seed(s)
            random.seed(s)
            np.random.seed(s)
            try:
                sample = self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)
        return (*sample, mask_noise(mask_seed, self.mask_patches)) if self.mask_patches else sample

    def __getitems__(self, keys):
        """A batch (the DataLoader's fetcher calls this): the samples' bytes are read together
        where the dataset can (prefetch), then each sample is made exactly as by __getitem__."""
        prefetch(self.dataset, [index for _, index in keys])
        return [self[key] for key in keys]


def prefetch(dataset, indices):
    """Let `dataset` (also under torch Subsets) read these samples' bytes at once, if it can
    (util.shards.ShardImageFolder.prefetch); the samples are unchanged."""
    while isinstance(dataset, Subset):
        indices, dataset = [dataset.indices[i] for i in indices], dataset.dataset
    if hasattr(dataset, "prefetch"):
        dataset.prefetch(indices)


def mask_noise(seed, num_patches):
    """One sample's mask noise: MAE's torch.rand(L) per sample, whose argsort is a uniformly
    random patch order (random_masking keeps the smallest), from the sample's own generator."""
    return torch.rand(num_patches, generator=torch.Generator().manual_seed(seed))


class TrainSampler(Sampler):
    """Shuffled per epoch (DistributedSampler's permutation: randperm seeded by seed +
    epoch) and cut into global batches of batch_size x world samples, rank r taking the
    r-th batch_size of each. Global batch k is then positions [k*B*W, (k+1)*B*W) of the
    permutation at any world size, so an accumulation group of one effective batch holds
    the same samples whether it is split over ranks or over micro-steps, and a resume
    on another world size addresses the global sample position. Yields (epoch, index)
    pairs for EpochSeeded; start_index skips this rank's first samples (a resume at
    step k sets k * batch_size).

    An epoch is whole accumulation groups: floor(size / effective batch) updates of
    accum_iter steps; the leftover samples (fewer than an effective batch) are dropped, as
    MAE's loop drops a short last group. A short group would update at full lr on a
    smaller batch, and the updates per epoch (and so the lr schedule) would depend on the
    world size; this way they depend on the dataset size and the effective batch only."""

    def __init__(self, dataset, batch_size, seed, accum_iter=1):
        self.size, self.batch_size, self.seed, self.accum_iter = len(dataset), batch_size, seed, accum_iter
        self.rank, self.world = get_rank(), get_world_size()
        self.epoch, self.start_index = 0, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def steps(self):
        """Steps per epoch: whole groups of accum_iter global batches."""
        return self.size // (self.batch_size * self.world * self.accum_iter) * self.accum_iter

    def describe(self):
        """The epoch's plan, for the start of the log."""
        left = self.size - self.steps() * self.batch_size * self.world
        return (f"{self.steps()} steps/epoch, {self.steps() // self.accum_iter} updates of "
                f"{self.batch_size * self.world * self.accum_iter} images"
                + (f" ({left} of {self.size} images, a different draw each epoch, left out: short of an "
                   "effective batch)" if left else ""))

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        b, per_step = self.batch_size, self.batch_size * self.world
        for k in range(self.start_index // b, self.steps()):
            first = k * per_step + self.rank * b
            yield from ((self.epoch, i) for i in order[first:first + b])

    def __len__(self):
        return max(self.steps() * self.batch_size - self.start_index, 0)
