"""Training images decoded and cropped fast: the default loader of every entry point
(--fast_decode; false gives the plain PIL path of util.datasets.checked_loader).

The plain path decodes the whole JPEG with PIL, then torchvision's RandomResizedCrop crops
and resizes it with PIL's bicubic filter, whose cost is about that of the decode itself
(benchmarks/data_speed.py, RESULTS.md "Input pipeline"). DecodeCrop does the same work in
this order, per file:

1. read the JPEG header (libjpeg-turbo through simplejpeg) and draw the crop box with the
   crop transform's own get_params: the same RNG calls as the plain path, so under
   util.datasets.EpochSeeded a sample gets the same box in both paths;
2. decode with libjpeg-turbo, at 1/2, 1/4 or 1/8 DCT scale only when the box still has
   at least the output's size at that scale (a reduced decode is never upsampled);
3. resize the box with torch's uint8 antialiased bicubic (or bilinear) kernel, which
   implements PIL's filter in vectorised fixed point (within 2 levels of 255 of PIL's;
   on real photos 99.7% of pixels equal: benchmarks/resize_levels.py, RESULTS.md).

Files that are not JPEGs libjpeg-turbo can turn into RGB or grey (PNG saved as .JPEG,
CMYK, ...) or that it rejects are decoded by PIL and converted to RGB, as the plain path.

Without simplejpeg (not installed, e.g. a fixed GPU image) every file goes through PIL,
whose draft mode gives the same reduced-DCT-scale decode of libjpeg(-turbo); DecodeCrop
says so in one warning line.
"""
import math
import sys

import numpy as np
import torch
import torch.nn.functional as Fn
from PIL import Image
from torchvision.transforms import InterpolationMode

from util.errors import BadImage
from util.shards import read_bytes
from util.sources import ImageReader, orient_pixels, unreadable

try:
    import simplejpeg
except ImportError:
    simplejpeg = None

RESIZE_MODES = {InterpolationMode.BICUBIC: "bicubic", InterpolationMode.BILINEAR: "bilinear"}
# libjpeg-turbo colour spaces it converts to RGB itself; grey stays one channel until the end
TURBO_OUTPUT = {"YCbCr": "RGB", "RGB": "RGB", "Gray": "GRAY"}


def dct_scale(box_h, box_w, out_h, out_w):
    """Largest libjpeg scale-down (1, 2, 4 or 8) at which the box still has at least the
    output's height and width, so that the resize after it only ever shrinks."""
    s = 1
    while s < 8 and box_h >= 2 * s * out_h and box_w >= 2 * s * out_w:
        s *= 2
    return s


_warned = []


def warn_without_turbo():
    """One line on stderr, once per process, when simplejpeg is missing."""
    if simplejpeg is None and not _warned:
        _warned.append(True)
        print("warning: simplejpeg is not installed: the fast loader decodes with PIL (same pixels, "
              "slower; pip install simplejpeg)", file=sys.stderr, flush=True)


class EncodedImage:
    """One file's bytes and header: size (upright with --exif_transpose), and how it will be
    decoded. `reader` (util.sources.ImageReader) holds the rules every decode path shares:
    mode conversion, EXIF orientation, the decompression-bomb limit."""

    def __init__(self, path, reader=None):
        reader = reader or ImageReader(any_mode=False)
        self.raw = raw = read_bytes(path)  # a file, or a shard's util.shards.Member
        self.name, self.reader, self.turbo = path, reader, None
        try:
            if simplejpeg is not None:
                self.height, self.width, colorspace, _ = simplejpeg.decode_jpeg_header(raw)
                self.turbo = TURBO_OUTPUT.get(colorspace)  # None: CMYK/YCCK go to PIL
        except ValueError:  # not a JPEG (a PNG with a .JPEG name), or a broken header
            pass
        if self.turbo is None:
            self.pil = reader.open(raw, path)  # reads the header only
            self.width, self.height = self.pil.size
            self.turn = reader.orientation(self.pil)
        else:
            reader.check_size(self.width, self.height, path)
            # libjpeg-turbo ignores EXIF: PIL reads the tag (a header read, only when asked)
            self.turn = reader.orientation(reader.open(raw, path)) if reader.exif_transpose else 1
        if self.turn in (5, 6, 7, 8):  # a quarter turn: the crop box is drawn on the upright size
            self.width, self.height = self.height, self.width

    @property
    def scalable(self):
        """Whether decode honours a DCT scale: libjpeg-turbo, or PIL's draft of an RGB/grey JPEG."""
        return self.turbo is not None or (self.pil.format == "JPEG" and self.pil.mode in ("RGB", "L"))

    def decode(self, scale):
        """(pixels, scale): (H, W, C) uint8, upright, RGB or (from libjpeg-turbo) one grey channel,
        at 1/scale of the full size (rounded up); PIL decodes at full size (scale 1) except
        a `scalable` file, which its draft mode decodes at 1/scale as libjpeg-turbo does."""
        stored_w, stored_h = (self.height, self.width) if self.turn in (5, 6, 7, 8) else (self.width, self.height)
        if self.turbo is not None:
            try:
                return orient_pixels(simplejpeg.decode_jpeg(self.raw, colorspace=self.turbo,
                                                            min_height=math.ceil(stored_h / scale),
                                                            min_width=math.ceil(stored_w / scale)), self.turn), scale
            except ValueError:  # libjpeg-turbo's warnings are errors here: PIL decides, as
                self.pil = self.reader.open(self.raw, self.name)  # in the plain path
                scale = 1
        elif scale > 1 and self.scalable:
            # draft picks the largest scale a with size // a >= the request: W // s gives s
            self.pil.draft(self.pil.mode, (stored_w // scale, stored_h // scale))
            if self.pil.size != (math.ceil(stored_w / scale), math.ceil(stored_h / scale)):
                self.pil = self.reader.open(self.raw, self.name)  # draft declined: full size
                scale = 1
        else:
            scale = 1
        return np.array(self.reader.rgb(self.pil)), scale  # upright, a writable copy, for torch


class DecodeCrop:
    """ImageFolder loader that does a random resized crop while decoding.

    `crop` is the plain path's crop transform (torchvision RandomResizedCrop,
    util.datasets.MAERandomResizedCrop, timm's RandomResizedCropAndInterpolation): its
    get_params, size and interpolation are used. Returns a uint8 (3, H, W) tensor, or with
    pil=True an RGB PIL image for PIL transforms that follow (timm's RandAugment). `reader`:
    the source's util.sources.ImageReader (default: an ImageFolder's, convert('RGB'))."""

    def __init__(self, crop, pil=False, reader=None):
        if not self.supports(crop):
            raise ValueError(f"DecodeCrop cannot stand for {crop}")
        self.crop, self.pil = crop, pil
        self.reader = reader or ImageReader(any_mode=False)
        size = crop.size
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.mode = RESIZE_MODES[crop.interpolation]
        warn_without_turbo()

    @staticmethod
    def supports(crop):
        return all(hasattr(crop, a) for a in ("get_params", "scale", "ratio", "size")) \
            and getattr(crop, "interpolation", None) in RESIZE_MODES

    def using(self, reader):
        """This loader with the source's reader (util.datasets.build_dataset)."""
        return DecodeCrop(self.crop, self.pil, reader)

    def __call__(self, path):
        image = self.read(path, lambda p: EncodedImage(p, self.reader), path)
        top, left, h, w = self.crop.get_params(torch.empty(0, image.height, image.width),
                                               self.crop.scale, self.crop.ratio)
        s = dct_scale(h, w, *self.size) if image.scalable else 1
        pixels, s = self.read(path, image.decode, s)
        # (1, C, H, W) with channels-last strides: the layout of torch's vectorised uint8 resize
        x = torch.from_numpy(pixels).permute(2, 0, 1)[None]
        # the box at 1/s, rounded outwards: it covers the drawn box and is never smaller
        # than the output (dct_scale), for less than one decoded pixel more on each side
        box = x[..., top // s:math.ceil((top + h) / s), left // s:math.ceil((left + w) / s)]
        out = Fn.interpolate(box, size=self.size, mode=self.mode, antialias=True)[0].expand(3, -1, -1)
        if self.pil:
            return Image.fromarray(out.permute(1, 2, 0).contiguous().numpy())
        return out

    @staticmethod
    def read(path, fn, arg):
        """fn(arg), failing with one line that names the file."""
        try:
            return fn(arg)
        except BadImage:
            raise
        except Exception as e:  # truncated, not an image, unreadable
            raise unreadable(path, e) from None
