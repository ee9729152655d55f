"""How far util/jpeg.py's resize is from PIL's, on real JPEGs: for each image one
RandomResizedCrop box (scale 0.2-1, bicubic, the pretraining crop) of the full-scale
decode, resized by torch's uint8 antialiased bicubic (what DecodeCrop does) and by PIL's
bicubic (the plain path); prints the largest |difference| and how many pixels differ
by 0, 1, 2 and 3+ levels of 255.

    D=$(mktemp -d) && tar xf ../shared/data/imagenet-sample/images.tar -C "$D"
    python benchmarks/resize_levels.py --data_path "$D/imagenet-sample" --every 5
"""
import argparse
import glob
import os

import numpy as np
import torch
import torch.nn.functional as Fn
from PIL import Image
from torchvision import transforms


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_path", required=True, help="a folder of JPEG files")
    p.add_argument("--every", type=int, default=1, help="take every N-th file (sorted by name)")
    p.add_argument("--input_size", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)
    cli = p.parse_args()
    crop = transforms.RandomResizedCrop(cli.input_size, scale=(0.2, 1.0),
                                        interpolation=transforms.InterpolationMode.BICUBIC)
    paths = sorted(glob.glob(os.path.join(cli.data_path, "*.JPEG")))[::cli.every]
    size = (cli.input_size, cli.input_size)
    torch.manual_seed(cli.seed)
    counts = np.zeros(256, np.int64)
    for path in paths:
        img = Image.open(path).convert("RGB")
        top, left, h, w = crop.get_params(img, crop.scale, crop.ratio)
        want = np.asarray(img.crop((left, top, left + w, top + h)).resize(size, Image.BICUBIC))
        x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None, :, top:top + h, left:left + w]
        got = Fn.interpolate(x, size=size, mode="bicubic", antialias=True)[0].permute(1, 2, 0).numpy()
        counts += np.bincount(np.abs(got.astype(int) - want.astype(int)).ravel(), minlength=256)
    n = counts.sum()
    print(f"{len(paths)} images, one {cli.input_size} px box each: max |difference| "
          f"{np.nonzero(counts)[0].max()} levels of 255; pixels at 0 / 1 / 2 / 3+ levels: "
          f"{counts[0]} / {counts[1]} / {counts[2]} / {counts[3:].sum()} of {n}")


if __name__ == "__main__":
    main()
