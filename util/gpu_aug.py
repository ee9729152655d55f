"""MAE's pretraining augmentation with the JPEG decode moved to the device.

util.datasets.pretrain_transform decodes with PIL and crops/resizes on CPU cores, at a
rate that one GPU can outrun by far (benchmarks/data_speed.py, RESULTS.md). Here the work
is split, with the same semantics:

- in the data workers (cheap): read_encoded reads the file's bytes and the size from its
  header without decoding; PlanCrop draws RandomResizedCrop's box (scale 0.2-1, ratio
  3/4-4/3) and the flip with the same torch RNG calls in the same order as
  pretrain_transform, so under EpochSeeded a sample gets the same crop in both paths;
- on the device: decode_augment decodes the batch with torchvision.io.decode_jpeg (nvjpeg
  on CUDA, libjpeg-turbo on CPU), then crops, resizes (bicubic, antialiased: the filter
  of torch's interpolate(antialias=True) and PIL, written as two matrix products per
  group of same-size images, the crop and the flip folded into the matrices), rounds to
  uint8 as the per-image path does, and normalises.

Files that are not baseline RGB/grey JPEGs (PNG, CMYK, ...) are decoded with PIL in the
worker and only cropped on the device. Pixel values differ from the PIL path by
resampling rounding (a few levels out of 255, tested) and from the per-image
torchvision resized_crop by at most one level. main_pretrain --gpu_decode uses it
through DeviceDecodeLoader, which decodes one batch ahead in a thread of its own (on a
CUDA side stream), so the decode overlaps the training step.
The CUDA path is tested by the cuda-marked tests (benchmarks/gpu_acceptance.py).
"""
import queue
import threading
from typing import NamedTuple

import numpy as np
import torch
from torchvision import transforms
from torchvision.io import ImageReadMode, decode_jpeg

from util.amp import full_fp32_matmul
from util.datasets import IMAGENET_MEAN, IMAGENET_STD
from util.errors import BadImage
from util.shards import read_bytes
from util.sources import ImageReader, unreadable


class ReadEncoded:
    """ImageFolder loader: (bytes as a 1-d uint8 tensor, or a decoded (3, H, W) uint8
    tensor for files decode_jpeg may not handle, height, width). `reader`: the source's
    util.sources.ImageReader (mode conversion, EXIF orientation, size limit); a JPEG that
    must be turned upright is decoded here, by PIL, as one decode_jpeg may not handle."""

    def __init__(self, reader=None):
        self.reader = reader or ImageReader(any_mode=False)

    def using(self, reader):
        return ReadEncoded(reader)

    def __call__(self, path):
        try:
            raw = read_bytes(path)  # a file, or a shard's util.shards.Member
            img = self.reader.open(raw, path)  # reads the header only
            if img.format == "JPEG" and img.mode in ("RGB", "L") and self.reader.orientation(img) == 1:
                return torch.frombuffer(bytearray(raw), dtype=torch.uint8), img.height, img.width
            rgb = np.asarray(self.reader.rgb(img))
            return torch.from_numpy(rgb.copy()).permute(2, 0, 1), rgb.shape[0], rgb.shape[1]
        except BadImage:
            raise
        except Exception as e:  # truncated, not an image, unreadable
            raise unreadable(path, e) from None


read_encoded = ReadEncoded()


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


class Packed(NamedTuple):
    """A batch's data (read_encoded's) in two tensors: a worker hands each tensor of a batch
    over in shared memory with a file descriptor of its own (torch's file_descriptor
    strategy), so a list of 128 byte tensors took 128 descriptors per batch in flight (in the
    worker and in the receiving process), and larger batches failed near a 1,024 limit. `flat`: every item's bytes back to back
    (uint8); `meta`: (N, 5) int64 [start, end, channels, height, width], channels 0 for
    encoded bytes, else a decoded image stored height x width x channels (the worker's
    layout, so packing it copies nothing more). A namedtuple: the DataLoader's pin_memory
    pins the two tensors and keeps the type."""
    flat: torch.Tensor
    meta: torch.Tensor

    @staticmethod
    def pack(datas):
        parts, meta, start = [], [], 0
        for d in datas:
            if d.dim() == 1:
                parts.append(d)
                shape = (0, 0, 0)
            else:
                c, h, w = d.shape
                parts.append(d.permute(1, 2, 0).reshape(-1))  # a view for read_encoded's HWC images
                shape = (c, h, w)
            meta.append((start, start + parts[-1].numel(), *shape))
            start += parts[-1].numel()
        flat = torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)
        return Packed(flat, torch.tensor(meta, dtype=torch.int64).view(-1, 5))

    def unpack(self):
        """The items as views into `flat` (no copy): 1-d bytes, or (C, H, W) images."""
        out = []
        for start, end, c, h, w in self.meta.tolist():
            d = self.flat[start:end]
            out.append(d if c == 0 else d.view(h, w, c).permute(2, 0, 1))
        return out


def collate_encoded(batch):
    """DataLoader collate for (PlanCrop output, target): (Packed data, params (N, 5), targets)."""
    items, targets = zip(*batch)
    return Packed.pack([d for d, _ in items]), torch.stack([p for _, p in items]), torch.tensor(targets)


# bicubic convolution with a = -0.5: the kernel of PIL's and torch's antialiased bicubic
CUBIC_A = -0.5


def cubic(x):
    x = x.abs()
    a = CUBIC_A
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resize_weights(start, length, out_size, extent, flip=None):
    """(N, out_size, extent) float32: row i of image n holds the weights output pixel i
    takes from source pixels 0..extent-1 when the box [start[n], start[n] + length[n])
    is resized to out_size, as torch's interpolate(mode="bicubic", antialias=True)
    computes them (support and taps of aten's _compute_weights_aa); rows reversed where
    flip[n] (the horizontal flip). start, length, flip: (N,) tensors on the device."""
    length = length.to(torch.float32)
    scale = length / out_size
    stretch = scale.clamp(min=1.0)  # the filter widens by the downscale factor (antialias)
    support = 2.0 * stretch
    center = scale[:, None] * (torch.arange(out_size, device=scale.device) + 0.5)  # (N, S) in box coordinates
    lo = (center - support[:, None] + 0.5).trunc().clamp(min=0)
    hi = torch.minimum((center + support[:, None] + 0.5).trunc(), length[:, None])
    j = (torch.arange(extent, device=scale.device) - start[:, None]).to(torch.float32)[:, None, :]  # (N, 1, E)
    w = cubic((j - center[..., None] + 0.5) / stretch[:, None, None])
    w = w * ((j >= lo[..., None]) & (j < hi[..., None]))
    w = w / w.sum(-1, keepdim=True)
    if flip is not None:
        w = torch.where(flip[:, None, None], w.flip(1), w)
    return w


def crop_resize_flip(images, params, size):
    """images: (n, C, H, W) uint8 of one size; params: (n, 5) [top, left, h, w, flip]
    on the device. The crop, antialiased bicubic resize to size x size and flip of each
    image, as float32 (n, C, size, size) rounded to integers in 0..255."""
    n, _, height, width = images.shape
    top, left, h, w, flip = params.unbind(1)
    wy = resize_weights(top, h, size, height)  # (n, S, H)
    wx = resize_weights(left, w, size, width, flip.bool())  # (n, S, W)
    with full_fp32_matmul():  # TF32 would move pixels by up to 2 levels
        out = wy[:, None] @ images.float() @ wx[:, None].transpose(-1, -2)
    return out.round_().clamp_(0, 255)


def normalizer(device, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """(mean, std) as (1, 3, 1, 1) tensors on `device`, in units of uint8 levels: made once."""
    return tuple(torch.tensor(v, device=device).view(1, 3, 1, 1) * 255 for v in (mean, std))


def decode_augment(datas, params, input_size, device, norm=None):
    """Decode on `device`, crop + resize + flip, normalise: (N, 3, S, S) float32.
    `datas`: a list of read_encoded's data or a Packed batch of them.
    One decode_jpeg call for the batch's JPEGs, then one crop_resize_flip per group of
    images of the same decoded size (a few matrix products, not kernels per image).
    `norm`: normalizer(device), made once by the caller (default: made here)."""
    device = torch.device(device)
    datas = datas.unpack() if isinstance(datas, Packed) else datas
    mean, std = norm if norm is not None else normalizer(device)
    imgs = [None] * len(datas)
    jpegs = [i for i, d in enumerate(datas) if d.dim() == 1]
    if jpegs:
        decoded = decode_jpeg([datas[i] for i in jpegs], mode=ImageReadMode.RGB, device=device)
        for i, img in zip(jpegs, decoded):
            imgs[i] = img
    for k, d in enumerate(datas):
        if imgs[k] is None:  # decoded in the worker
            imgs[k] = d.to(device, non_blocking=True)
    groups = {}
    for k, img in enumerate(imgs):
        groups.setdefault(tuple(img.shape), []).append(k)
    if len(groups) == 1:
        return (crop_resize_flip(torch.stack(imgs), upload(params, device), input_size) - mean) / std
    order = [k for members in groups.values() for k in members]
    params, order_d = upload_with_order(params, order, device)
    out, start = torch.empty(len(datas), 3, input_size, input_size, device=device), 0
    for members in groups.values():
        idx = order_d[start:start + len(members)]  # a view: no copy, no sync
        out[idx] = crop_resize_flip(torch.stack([imgs[k] for k in members]), params[idx], input_size)
        start += len(members)
    return (out - mean) / std


def upload(host, device):
    """One host-to-device copy that does not block the calling thread: from pinned memory
    on CUDA (a pageable copy is synchronous), unchanged on CPU."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def upload_with_order(params, order, device):
    """params (N, 5) and the batch's indices grouped by image size (N,) in one copy:
    a batch of real photos has dozens of sizes, and a copy per group syncs per group."""
    both = upload(torch.cat([params.to(torch.int64).flatten(), torch.tensor(order, dtype=torch.int64)]), device)
    return both[:params.numel()].view(params.shape), both[params.numel():]


class DeviceDecodeLoader:
    """Wraps a DataLoader of collate_encoded batches; yields (decoded, augmented and
    normalised images on `device`, targets[, mask noise]), as the PIL pipeline's loader would.
    Keeps the wrapped loader's sampler and length (set_epoch, mid-epoch resume).

    The decode runs one batch ahead in a thread of its own (BackgroundDecode): batch k+1
    decodes while the training thread runs step k, whose host time decode_jpeg's own
    synchronisations would otherwise add to. Batches are still fetched from the DataLoader
    in the training thread: with --num_workers 0 the fetch seeds the process's RNGs
    (EpochSeeded), which another thread would race with.

    On CUDA the thread decodes on a side stream and hands the batch over with an event: the
    training stream waits for it without a host sync. nvJPEG writes its outputs on a stream
    of its own that does not wait for the stream current at the call (pytorch/vision PR 9606,
    meta-pytorch/torchcodec PR 1634): blocks freed by work still queued on that stream can
    be handed to it and overwritten. Hence the side stream, whose memory pool holds no block
    of the training stream (the caching allocator keeps one per stream), a synchronize of
    the side stream's own earlier work before each decode (in the decode thread), and
    record_stream on the handed-over images, so that the side stream reuses their memory
    only after the training stream has read them. On CPU the streams are no-ops."""

    def __init__(self, loader, input_size, device):
        self.loader, self.input_size, self.device = loader, input_size, torch.device(device)
        self.sampler = loader.sampler
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.norm = None  # made on the stream that reads it (start)

    def __len__(self):
        return len(self.loader)

    def start(self, batch):
        """Decode a (datas, params, targets[, mask noise]) batch: (images, the rest, event
        the images are ready at, None on CPU). On CUDA this returns once the work is queued
        on the side stream; any thread may call it."""
        datas, params, *rest = batch
        if self.stream is None:
            self.norm = self.norm or normalizer(self.device)
            return decode_augment(datas, params, self.input_size, self.device, self.norm), rest, None
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            self.stream.synchronize()  # nothing queued here may still read a block nvJPEG gets
            self.norm = self.norm or normalizer(self.device)  # made on the side stream: read in order
            images = decode_augment(datas, params, self.input_size, self.device, self.norm)
            return images, rest, self.stream.record_event()

    def hand_over(self, started):
        """The started batch, safe to use on the current stream (no host sync)."""
        images, rest, done = started
        if done is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(done)
            images.record_stream(current)
        return (images, *rest)

    def __iter__(self):
        batches = iter(self.loader)
        decoder = BackgroundDecode(self.start)
        try:
            pending = decoder.submit(next(batches, None))
            while pending:
                pending = decoder.submit(next(batches, None))  # batch k+1 decodes during step k
                yield self.hand_over(decoder.result())
        finally:  # epoch end, the consumer stopped early, or an error: the thread ends here
            decoder.close()


class BackgroundDecode:
    """A thread that runs `work` on the submitted items in order, one at a time; results
    (or the exception `work` raised, re-raised as is, so a UserError stays one line) come
    back in the same order. close() ends the thread; daemon, so it never holds up exit."""

    def __init__(self, work):
        self.todo, self.done, self.closing = queue.Queue(), queue.Queue(), False
        self.thread = threading.Thread(target=self._run, args=(work,), name="gpu-decode", daemon=True)
        self.thread.start()

    def _run(self, work):
        with torch.no_grad():
            while (item := self.todo.get()) is not None and not self.closing:
                try:
                    self.done.put((work(item), None))
                except BaseException as e:  # noqa: B036 - surfaces in the training thread
                    self.done.put((None, e))
                    return

    def submit(self, item):
        """Queue `item` (None: nothing more); returns whether one was queued."""
        if item is not None:
            self.todo.put(item)
        return item is not None

    def result(self):
        out, error = self.done.get()
        if error is not None:
            raise error
        return out

    def close(self):
        self.closing = True  # a batch still queued is dropped, not decoded
        self.todo.put(None)
        self.thread.join()
