"""MAE's pretraining augmentation with the JPEG decode moved to the device.

util.datasets.pretrain_transform decodes with PIL and crops/resizes on CPU cores, at a
rate that one GPU can outrun by far (benchmarks/data_speed.py, RESULTS.md). Here the work
is split, with the same semantics:

- in the data workers (cheap): read_encoded reads the file's bytes and the size from its
  header without decoding; PlanCrop draws RandomResizedCrop's box (scale 0.2-1, ratio
  3/4-4/3) and the flip with the same torch RNG calls in the same order as
  pretrain_transform, so under EpochSeeded a sample gets the same crop in both paths;
- on the device: decode_augment decodes the batch with torchvision.io.decode_jpeg (nvjpeg
  on CUDA, libjpeg-turbo on CPU), then crops, resizes (bicubic, antialiased, rounded to
  uint8 as PIL does), flips and normalises each image.

Files that are not baseline RGB/grey JPEGs (PNG, CMYK, ...) are decoded with PIL in the
worker and only cropped on the device. Pixel values differ from the PIL path by
resampling rounding (a few levels out of 255, tested). main_pretrain --gpu_decode
uses it through DeviceDecodeLoader. The CUDA path has not been run in this project yet.
"""
import io

import numpy as np
import torch
from PIL import Image
from torchvision import transforms
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from util.datasets import IMAGENET_MEAN, IMAGENET_STD
from util.errors import UserError
from util.shards import read_bytes


def read_encoded(path):
    """ImageFolder loader: (bytes as a 1-d uint8 tensor, or a decoded (3, H, W) uint8
    tensor for files decode_jpeg may not handle, height, width)."""
    try:
        raw = read_bytes(path)  # a file, or a shard's util.shards.Member
        img = Image.open(io.BytesIO(raw))  # reads the header only
        if img.format == "JPEG" and img.mode in ("RGB", "L"):
            return torch.frombuffer(bytearray(raw), dtype=torch.uint8), img.height, img.width
        rgb = np.asarray(img.convert("RGB"))
        return torch.from_numpy(rgb.copy()).permute(2, 0, 1), img.height, img.width
    except Exception as e:  # truncated, not an image, unreadable
        raise UserError(f"cannot read image {path}: {e}") from None


class PlanCrop:
    """Transform for read_encoded's output: draws the crop box and the flip exactly as
    RandomResizedCrop + RandomHorizontalFlip do; returns (data, [top, left, h, w, flip])."""

    def __init__(self, scale=(0.2, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0)):
        self.scale, self.ratio = scale, ratio

    def __call__(self, item):
        data, height, width = item
        shape_only = torch.empty((0, height, width))  # get_params reads the size only
        top, left, h, w = transforms.RandomResizedCrop.get_params(shape_only, self.scale, self.ratio)
        flip = int(torch.rand(1) < 0.5)
        return data, torch.tensor([top, left, h, w, flip])


def collate_encoded(batch):
    """DataLoader collate for (PlanCrop output, target): (list of data, params (N, 5), targets)."""
    items, targets = zip(*batch)
    return [d for d, _ in items], torch.stack([p for _, p in items]), torch.tensor(targets)


def decode_augment(datas, params, input_size, device, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Decode on `device`, crop + resize + flip per image, normalise: (N, 3, S, S) float32."""
    device = torch.device(device)
    imgs = [None] * len(datas)
    jpegs = [i for i, d in enumerate(datas) if d.dim() == 1]
    if jpegs:
        decoded = decode_jpeg([datas[i] for i in jpegs], mode=ImageReadMode.RGB, device=device)
        for i, img in zip(jpegs, decoded):
            imgs[i] = img
    out = torch.empty(len(datas), 3, input_size, input_size, dtype=torch.uint8, device=device)
    for k, (img, (top, left, h, w, flip)) in enumerate(zip(imgs, params.tolist())):
        if img is None:  # decoded in the worker
            img = datas[k].to(device, non_blocking=True)
        crop = TF.resized_crop(img, top, left, h, w, [input_size, input_size],
                               interpolation=transforms.InterpolationMode.BICUBIC, antialias=True)
        out[k] = crop.flip(-1) if flip else crop
    mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
    return (out.float() - mean) / std


class DeviceDecodeLoader:
    """Wraps a DataLoader of collate_encoded batches; yields (decoded, augmented and
    normalised images on `device`, targets), as the PIL pipeline's loader would.
    Keeps the wrapped loader's sampler and length (set_epoch, mid-epoch resume)."""

    def __init__(self, loader, input_size, device):
        self.loader, self.input_size, self.device = loader, input_size, torch.device(device)
        self.sampler = loader.sampler

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for datas, params, targets in self.loader:
            yield decode_augment(datas, params, self.input_size, self.device), targets
