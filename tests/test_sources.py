"""util/sources.py: unlabeled trees, file lists, the held-out split and image modes."""
import argparse
import contextlib
import io
import os
import random
import re

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, assert_one_line_error, run_script
from util.datasets import held_out
from util.errors import UserError
from util.sources import (ListedImages, any_mode_loader, holdout_split, list_images, names_digest,
                          read_file_list)


def make_mixed_tree(root):
    """A nested, classless tree of the formats and modes users have, plus a non-image."""
    (root / "a" / "b").mkdir(parents=True)
    (root / "c").mkdir()
    Image.new("RGB", (20, 16), (10, 200, 30)).save(root / "a" / "x.JPG")
    Image.new("L", (20, 16), 128).save(root / "a" / "b" / "grey.png")
    Image.new("CMYK", (20, 16), (0, 255, 0, 0)).save(root / "c" / "cmyk.tiff")
    Image.new("RGB", (20, 16), (0, 0, 255)).convert("P", palette=Image.ADAPTIVE).save(root / "c" / "pal.bmp")
    Image.new("RGBA", (20, 16), (255, 0, 0, 0)).save(root / "c" / "clear.webp", lossless=True)
    Image.fromarray(np.full((16, 20), 65535, np.uint16)).save(root / "deep16.png")
    (root / "c" / "notes.txt").write_text("not an image")
    return root


def test_list_images_finds_every_image_sorted(tmp_path):
    names = list_images(make_mixed_tree(tmp_path))
    assert [p[len(str(tmp_path)) + 1:] for p in names] == sorted(
        ["a/x.JPG", "a/b/grey.png", "c/cmyk.tiff", "c/pal.bmp", "c/clear.webp", "deep16.png"])


def test_list_images_empty_tree_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no image files"):
        list_images(tmp_path)


def test_every_mode_loads_as_8bit_rgb(tmp_path):
    make_mixed_tree(tmp_path)
    for p in list_images(tmp_path):
        img = any_mode_loader(p)
        assert img.mode == "RGB" and img.size == (20, 16)
    # 16-bit white stays white (convert('RGB') alone would clip it), alpha 0 shows the white background
    assert any_mode_loader(tmp_path / "deep16.png").getpixel((0, 0)) == (255, 255, 255)
    assert any_mode_loader(tmp_path / "c" / "clear.webp").getpixel((0, 0)) == (255, 255, 255)


def test_16bit_mid_grey_scales_not_clips(tmp_path):
    Image.fromarray(np.full((4, 4), 32768, np.uint16)).save(tmp_path / "g.png")
    assert any_mode_loader(tmp_path / "g.png").getpixel((0, 0)) == (128, 128, 128)


def test_file_list_relative_absolute_and_labels(tmp_path):
    make_mixed_tree(tmp_path / "imgs")
    (tmp_path / "lists").mkdir()
    absolute = tmp_path / "imgs" / "deep16.png"
    (tmp_path / "lists" / "l.txt").write_text(f"../imgs/a/x.JPG 3\n\n{absolute} 0\n")
    paths, labels = read_file_list(tmp_path / "lists" / "l.txt")
    assert labels == [3, 0]
    ds = ListedImages(paths, labels)
    assert ds[0][1] == 3 and ds[0][0].size == (20, 16)
    (tmp_path / "lists" / "u.txt").write_text("../imgs/a/x.JPG\n")
    paths, labels = read_file_list(tmp_path / "lists" / "u.txt")
    assert labels is None and ListedImages(paths)[0][1] == -1


def test_file_list_mixed_labels_is_a_user_error(tmp_path):
    (tmp_path / "l.txt").write_text("a.png 1\nb.png\n")
    with pytest.raises(UserError, match="some lines have a label"):
        read_file_list(tmp_path / "l.txt")


def test_holdout_split_same_at_world_size_1_and_2():
    names = [f"img{i:05d}.png" for i in range(1000)]
    train, held = holdout_split(names, 0.01, seed=0)
    assert len(held) == 10 and sorted(train + held) == list(range(1000))
    # world size 2: rank 0 lists and broadcasts; each rank splits the same list the same way
    for _rank in range(2):
        assert holdout_split(list(names), 0.01, seed=0) == (train, held)
    assert names_digest([names[i] for i in held]) == names_digest([names[i] for i in held])


def test_holdout_split_holds_out_the_same_files_in_any_list_order(tmp_path):
    """Two `find`s of one folder list it in different orders: the same files are held out.
    A sorted listing (a tree) keeps the split it always had."""
    names = [f"d{i % 7}/img {i:03d}.png" for i in range(37)]
    random.Random(1).shuffle(names)
    train, held = holdout_split(names, 0.2)
    for order in (sorted(names), names[::-1]):
        t, h = holdout_split(order, 0.2)
        assert {order[i] for i in h} == {names[i] for i in held} and len(t) == len(train) == 30
    s = sorted(names)
    perm = np.random.default_rng(0).permutation(37)
    assert holdout_split(s, 0.2)[1] == sorted(perm[:7].tolist())
    for p in s:
        (tmp_path / p).parent.mkdir(exist_ok=True)
        (tmp_path / p).touch()
    for name, order in (("a.txt", names), ("b.txt", names[::-1])):
        (tmp_path / name).write_text("\n".join(order) + "\n")
    a, b = (read_file_list(tmp_path / n)[0] for n in ("a.txt", "b.txt"))
    assert {a[i] for i in holdout_split(a, 0.2)[1]} == {b[i] for i in holdout_split(b, 0.2)[1]}
    # and the start line's digest of the held-out names agrees
    args = argparse.Namespace(holdout=0.2)
    digests = []
    for name in ("a.txt", "b.txt"):
        with contextlib.redirect_stdout(io.StringIO()) as out:
            held_out(args, str(tmp_path / name), read_file_list(tmp_path / name)[0])
        digests.append(re.search(r"sha256 of their names (\w+)", out.getvalue()).group(1))
    assert digests[0] == digests[1]


def test_holdout_split_bounds():
    assert len(holdout_split(["a", "b", "c"], 0.01)[1]) == 1
    assert len(holdout_split([str(i) for i in range(10**6)], 0.01)[1]) == 5000
    with pytest.raises(UserError, match="at least 2"):
        holdout_split(["a"], 0.01)


def data_args(data_path, labels="folders", holdout=0.2):
    import argparse
    return argparse.Namespace(dataset=None, data_path=str(data_path), labels=labels, holdout=holdout,
                              class_subset=None)


def test_classless_tree_without_labels_none_hints_the_flag(tmp_path):
    from util.datasets import build_dataset
    (tmp_path / "train").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "a.png")
    with pytest.raises(UserError, match="use --labels none"):
        build_dataset(data_args(tmp_path), "train", None)


def test_labels_none_tree_without_val_splits_held_out(tmp_path):
    from util.datasets import build_dataset
    for i in range(10):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / f"{i}.png")
    train = build_dataset(data_args(tmp_path, "none"), "train", None)
    val = build_dataset(data_args(tmp_path, "none"), "val", None)
    assert len(train) == 8 and len(val) == 2 and train.classes == []
    names = {p for p, _ in train.samples} | {p for p, _ in val.samples}
    assert len(names) == 10 and all(t == -1 for _, t in train.samples + val.samples)


def test_file_list_data_path_keeps_labels(tmp_path):
    from util.datasets import build_dataset
    lines = []
    for i in range(5):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
        lines.append(f"{i}.png {i % 2}")
    (tmp_path / "list.txt").write_text("\n".join(lines))
    train = build_dataset(data_args(tmp_path / "list.txt"), "train", None)
    assert len(train) == 4 and train.classes == [0, 1]
    assert all(t == int(p[-5]) % 2 for p, t in train.samples)


def test_imagefolder_root_is_unchanged(tmp_path):
    from torchvision.datasets import ImageFolder
    from util.datasets import build_dataset
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / c / "x.jpg")
    ours = build_dataset(data_args(tmp_path), "train", None)
    ref = ImageFolder(str(tmp_path / "train"))
    assert ours.samples == ref.samples and ours.classes == ref.classes


def test_unlabeled_mixed_tree_pretrains_without_loss_ce(tmp_path):
    import json
    from conftest import TINY, run_script
    data = tmp_path / "data"
    make_mixed_tree(data)
    for i in range(26):  # enough for a batch of 16 after the held-out image
        Image.new("RGB", (40, 36), (i * 9, 50, 100)).save(data / "a" / f"rgb{i:02d}.png")
    out = tmp_path / "out"
    proc = run_script("main_pretrain.py", *TINY, "--data_path", data, "--labels", "none",
                      "--holdout", "0.1", "--val_interval", "1", "--diag_images", "3", "--vis_every", "1", "--output_dir", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "held out 3 of 32 images" in proc.stdout and "online classifier off" in proc.stdout
    stats = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert "train_loss_mae" in stats[-1] and not any("loss_ce" in k or "acc" in k for k in stats[-1])
    assert (out / "reconstruction-0.png").is_file()
    assert "diag_effective_rank" in stats[-1]  # label-free diagnostics ran on the held-out images


def test_unlabeled_tree_pretrains_on_two_ranks_with_the_same_held_out_split(tmp_path):
    """2 gloo ranks under DDP: the unused online head must still get (zero) gradients, and
    the held-out split is the one a single process makes."""
    import json
    from conftest import TINY, run_script
    data = tmp_path / "data"
    for i in range(71):  # prime: no batch divides it
        (data / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 36), (i * 3, 50, 100)).save(data / f"d{i % 3}" / f"img{i:02d}.png")
    outs = {}
    for world in (1, 2):
        out = tmp_path / f"out{world}"
        proc = run_script("main_pretrain.py", *TINY, "--batch_size", "8", "--data_path", data, "--labels", "none",
                          "--holdout", "0.1", "--output_dir", out, torchrun=world if world > 1 else 0)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs[world] = [line.split("] ", 1)[-1] for line in proc.stdout.splitlines() if "held out" in line]
        stats = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
        assert stats and not any("loss_ce" in k for k in stats[-1])
    assert outs[1] and outs[1][0] == outs[2][0] and "held out 7 of 71 images" in outs[1][0]


# ---- image modes, EXIF orientation and the size limit on every decode path -------------------
MODES = {  # name -> (how PIL makes it, the RGB every path must give)
    "rgb.jpg": (lambda s: Image.new("RGB", s, (10, 200, 30)), (10, 200, 30)),
    "a/grey.png": (lambda s: Image.new("L", s, 77), (77, 77, 77)),
    "a/b/cmyk.jpg": (lambda s: Image.new("CMYK", s, (0, 255, 0, 0)), (255, 0, 255)),
    "a/b/cmyk.tiff": (lambda s: Image.new("CMYK", s, (0, 0, 255, 0)), (255, 255, 0)),
    "pal.bmp": (lambda s: Image.new("RGB", s, (0, 0, 255)).convert("P", palette=Image.ADAPTIVE), (0, 0, 255)),
    "c/clear.png": (lambda s: Image.new("RGBA", s, (255, 0, 0, 0)), (255, 255, 255)),  # alpha 0: the background
    "c/half.webp": (lambda s: Image.new("RGBA", s, (0, 0, 0, 128)), (127, 127, 127)),
    "c/d/deep16.png": (lambda s: Image.fromarray(np.full(s[::-1], 32768, np.uint16)), (128, 128, 128)),
    "c/d/deep16.tif": (lambda s: Image.fromarray(np.full(s[::-1], 16384, np.uint16)), (64, 64, 64)),
    "tiny.png": (lambda s: Image.new("RGB", (3, 2), (250, 5, 120)), (250, 5, 120)),  # smaller than the input
    "tiny.jpg": (lambda s: Image.new("RGB", (5, 4), (40, 90, 160)), (40, 90, 160)),
}


def make_mode_tree(root, size=(40, 30)):
    """train/ (every mode of MODES, nested) and val/; returns {path: expected RGB}."""
    want = {}
    for name, (make, rgb) in MODES.items():
        path = root / "train" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        kw = {"quality": 100, "subsampling": 0} if name.endswith(".jpg") else {"lossless": True} \
            if name.endswith(".webp") else {}
        make(size).save(path, **kw)
        want[str(path)] = rgb
    (root / "val").mkdir()
    Image.new("RGB", size).save(root / "val" / "v.png")
    return want


def pretrain_args(data, *extra):
    from conftest import TINY
    from main_pretrain import get_args_parser
    return get_args_parser().parse_args(TINY + ["--data_path", str(data), "--batch_size", "2", *extra])


@pytest.mark.parametrize("fast", ["true", "false"])
def test_every_mode_and_tiny_images_give_the_same_rgb_on_the_train_path(tmp_path, fast):
    """The real train transform (build_train_set: DecodeCrop on the default path) of a nested
    mixed-format tree: each uniform image stays its colour after crop and resize, as
    util.sources.to_rgb says (the fast path once dropped alpha and clipped 16 bits)."""
    from main_pretrain import build_train_loader
    from util.datasets import IMAGENET_MEAN, IMAGENET_STD, build_train_set, pretrain_transform
    from util.jpeg import DecodeCrop
    want = make_mode_tree(tmp_path)
    args = pretrain_args(tmp_path, "--labels", "none", "--fast_decode", fast)
    dataset, normalize = build_train_set(args, pretrain_transform(32))
    assert isinstance(dataset.loader, DecodeCrop) == (fast == "true")
    assert len(dataset) == len(MODES)
    for i, (path, _) in enumerate(dataset.samples):
        torch.manual_seed(i)
        x = dataset[i][0]
        x = x.float() if normalize else x * torch.tensor(IMAGENET_STD)[:, None, None] * 255 \
            + torch.tensor(IMAGENET_MEAN)[:, None, None] * 255
        assert x.shape == (3, 32, 32), path
        assert (x - torch.tensor(want[path], dtype=torch.float32)[:, None, None]).abs().max() <= 2.5, \
            (path, x.mean((1, 2)))
    loader = build_train_loader(args, torch.device("cpu"))  # and the loader runs through an epoch
    assert sum(images.shape[0] for images, *_ in loader) == len(MODES) // 2 * 2


def sideways_photo(path, fmt="JPEG"):
    """Stored 64x48, left half red, right half blue, with EXIF orientation 6 (a phone held
    upright): shown upright it is 48x64, red on top, blue below."""
    a = np.zeros((48, 64, 3), np.uint8)
    a[:, :32, 0], a[:, 32:, 2] = 255, 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(a).save(path, format=fmt, exif=exif, **({"quality": 100} if fmt == "JPEG" else {}))
    return str(path)


def red_on_top(x):
    """Whether a (3, H, W) crop of the whole sideways photo is red above and blue below."""
    x = x.float()
    top, bottom = x[:, :x.shape[1] // 2 - 2], x[:, x.shape[1] // 2 + 2:]
    return bool(top[0].mean() > 200 and top[2].mean() < 50 and bottom[2].mean() > 200 and bottom[0].mean() < 50)


def red_on_left(x):
    return red_on_top(x.transpose(1, 2))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_on_every_decode_path_only_when_asked(tmp_path, fmt):
    from torchvision import transforms
    from torchvision.transforms.functional import pil_to_tensor
    from util.datasets import build_dataset
    from util.gpu_aug import read_encoded
    from util.jpeg import DecodeCrop
    for split in ("train", "val"):
        (tmp_path / "data" / split).mkdir(parents=True)
    path = sideways_photo(tmp_path / "data" / "train" / f"p.{fmt.lower()}", fmt)
    whole = transforms.RandomResizedCrop(32, scale=(1, 1), ratio=(0.75, 0.75),  # all of the 48x64 upright photo
                                         interpolation=transforms.InterpolationMode.BICUBIC)
    for flag, upright in (("true", True), ("false", False)):
        args = pretrain_args(tmp_path / "data", "--labels", "none", "--exif_transpose", flag)
        plain = build_dataset(args, "train", None).loader
        fast = build_dataset(args, "train", None, loader=DecodeCrop(whole)).loader
        gpu = build_dataset(args, "train", None, loader=read_encoded).loader
        img = plain(path)
        assert img.size == ((48, 64) if upright else (64, 48))
        data, height, width = gpu(path)
        assert (height, width) == ((64, 48) if upright else (48, 64))
        check = red_on_top if upright else red_on_left
        assert check(pil_to_tensor(img)), flag
        if upright:  # the GPU path's file bytes would reach nvJPEG, which knows no EXIF
            assert data.shape == (3, 64, 48) and check(data)
        torch.manual_seed(0)
        out = fast(path)
        assert out.shape == (3, 32, 32) and (not upright or check(out)), flag
        crop = transforms.RandomResizedCrop(24, scale=(0.2, 1), interpolation=transforms.InterpolationMode.BICUBIC)
        for seed in range(4):  # a random box: drawn on the upright size on both paths
            torch.manual_seed(seed)
            want = pil_to_tensor(crop(plain(path))).int()
            torch.manual_seed(seed)
            assert (DecodeCrop(crop).using(fast.reader)(path).int() - want).abs().max() <= 3, (flag, seed)


def test_exif_transpose_is_off_by_default():
    from main_pretrain import get_args_parser
    assert get_args_parser().parse_args([]).exif_transpose is False


def test_decompression_bomb_limit_is_one_line_naming_the_file_and_the_flag(tmp_path, capsys):
    """--max_image_pixels 100: a 12x10 image (over the limit) decodes with one warning line,
    a 20x16 one (over twice it, where PIL refuses) is one error naming it and the flag, on
    the plain and the fast path alike (libjpeg-turbo itself has no such limit)."""
    from torchvision import transforms
    from util.datasets import build_dataset
    from util.errors import BadImage
    from util.jpeg import DecodeCrop
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
    Image.new("RGB", (12, 10), (9, 9, 9)).save(tmp_path / "train" / "big.jpg")
    Image.new("RGB", (20, 16), (9, 9, 9)).save(tmp_path / "train" / "huge.jpg")
    Image.new("RGB", (20, 16)).save(tmp_path / "val" / "v.png")
    crop = transforms.RandomResizedCrop(8, interpolation=transforms.InterpolationMode.BICUBIC)
    args = pretrain_args(tmp_path, "--labels", "none", "--max_image_pixels", "100")
    for loader in (None, DecodeCrop(crop)):
        read = build_dataset(args, "train", None, loader=loader).loader
        for _ in range(2):
            read(str(tmp_path / "train" / "big.jpg"))
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and "big.jpg: 12x10 pixels, over PIL's decompression-bomb limit of 100" in err[0]
        with pytest.raises(BadImage, match=r"cannot read image .*huge\.jpg: 20x16 pixels, over twice "
                           r".* limit of 100; raise it with --max_image_pixels"):
            read(str(tmp_path / "train" / "huge.jpg"))
    args = pretrain_args(tmp_path, "--labels", "none", "--max_image_pixels", "0")  # no limit
    assert build_dataset(args, "train", None).loader(str(tmp_path / "train" / "huge.jpg")).size == (20, 16)


def test_a_decompression_bomb_stops_pretraining_with_one_line(tmp_path):
    from conftest import TINY, assert_one_line_error, run_script
    for split in ("train", "val"):
        (tmp_path / "d" / split).mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (40, 40), (i, 9, 9)).save(tmp_path / "d" / "train" / f"{i}.jpg")
    Image.new("RGB", (40, 40)).save(tmp_path / "d" / "val" / "v.png")
    proc = run_script("main_pretrain.py", *TINY, "--batch_size", "2", "--data_path", tmp_path / "d",
                      "--labels", "none", "--max_image_pixels", "500", "--output_dir", tmp_path / "o")
    assert_one_line_error(proc, "cannot read image", "0.jpg", "--max_image_pixels")


# ---- --skip_bad_images ------------------------------------------------------------------
def tree_with_a_truncated_jpeg(root, n=16):
    """train/ of n JPEGs in nested folders (the 6th truncated) and val/; returns the bad path."""
    for i in range(n):
        path = root / "train" / f"d{i % 3}" / f"{i:02d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 40), (i * 15, 255 - i * 15, 99)).save(path)
    (root / "val").mkdir()
    Image.new("RGB", (40, 40)).save(root / "val" / "v.png")
    bad = sorted((root / "train").rglob("*.jpg"))[5]
    bad.write_bytes(bad.read_bytes()[:150])
    return bad


def test_a_skipped_bad_image_is_the_next_indexs_sample(tmp_path):
    from util.datasets import EpochSeeded, build_train_set, pretrain_transform
    from util.errors import BadImage
    bad = tree_with_a_truncated_jpeg(tmp_path)
    args = pretrain_args(tmp_path, "--labels", "none")
    dataset, _ = build_train_set(args, pretrain_transform(32))
    i = [p for p, _ in dataset.samples].index(str(bad))
    with pytest.raises(BadImage, match=f"cannot read image {re.escape(str(bad))}"):
        EpochSeeded(dataset, seed=0, mask_patches=64)[(1, i)]
    skipping = EpochSeeded(dataset, seed=0, mask_patches=64, skip_bad=True)
    got, want = skipping[(1, i)], skipping[(1, i + 1)]
    assert torch.equal(got[0], want[0]) and got[1] == want[1] == -1 and torch.equal(got[2], want[2])
    assert skipping.skipped.value == 1


@pytest.mark.parametrize("ranks", [1, 2])
def test_skip_bad_images_counts_them_in_log_txt(tmp_path, ranks):
    """A truncated JPEG in the tree: one line naming it, the run goes on, log.txt counts it
    each epoch (summed over ranks: one rank read it) and two runs end at the same weights."""
    import json
    from conftest import TINY, run_script
    bad = tree_with_a_truncated_jpeg(tmp_path / "d")
    flags = [*TINY, "--batch_size", str(8 // ranks), "--epochs", "2", "--data_path", tmp_path / "d",
             "--labels", "none", "--skip_bad_images", "--num_workers", "1"]
    weights = []
    for run in ("a", "b"):
        proc = run_script("main_pretrain.py", *flags, "--output_dir", tmp_path / run, torchrun=ranks)
        assert proc.returncode == 0, proc.stderr[-2000:]
        lines = [line for line in proc.stderr.splitlines() if "skipped (--skip_bad_images)" in line]
        assert len(lines) == 2 and all(f"cannot read image {bad}" in line for line in lines), proc.stderr
        stats = [json.loads(line) for line in (tmp_path / run / "log.txt").read_text().splitlines()]
        assert [s["train_skipped_images"] for s in stats] == [1, 1]
        assert "epoch 1: 1 unreadable training images skipped" in proc.stdout
        weights.append(torch.load(tmp_path / run / "checkpoint-1.pth", weights_only=True)["model"])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


LISTING_SCRIPT = '''
import json, os, sys
sys.path.insert(0, {repo!r})
import argparse
from util.dist import cleanup, get_rank, init_distributed_mode
from util.datasets import build_dataset
from util.errors import UserError
init_distributed_mode(argparse.Namespace(device="cpu", dist_timeout=30))  # a hang fails, a loaded machine not
calls = []
real_scandir = os.scandir
os.scandir = lambda *a: calls.append(a) or real_scandir(*a)  # os.walk walks with it
args = argparse.Namespace(dataset=None, data_path={data!r}, labels="none", holdout=0.1, class_subset=None)
train = [p for p, _ in build_dataset(args, "train", None).samples]
val = [p for p, _ in build_dataset(args, "val", None).samples]
try:
    build_dataset(argparse.Namespace(**{{**vars(args), "data_path": {empty!r}}}), "train", None)
    err = None
except UserError as e:
    err = str(e)
json.dump(dict(train=train, val=val, scandirs=len(calls), err=err), open(f"{out}/rank{{get_rank()}}.json", "w"))
cleanup()  # exiting with the gloo group alive aborts now and then ("terminate called without an active exception")
'''


def test_only_rank0_lists_the_tree_and_every_rank_gets_its_list(tmp_path):
    """2 gloo ranks: rank 0 walks the tree once (train and val share the listing), rank 1
    never touches the file system's directories and gets the same lists; an empty tree
    is the same error on both ranks instead of rank 1 waiting in the broadcast."""
    import json
    from conftest import REPO, run_script
    data, empty = tmp_path / "data", tmp_path / "empty"
    for i in range(12):
        (data / f"d{i % 3}" / "deep").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(data / f"d{i % 3}" / "deep" / f"{i}.png")
    empty.mkdir()
    script = tmp_path / "listing.py"
    script.write_text(LISTING_SCRIPT.format(repo=REPO, data=str(data), empty=str(empty), out=str(tmp_path)))
    proc = run_script(script, torchrun=2, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r1["scandirs"] == 0 and r0["scandirs"] == 1 + 3 * 2 + 1  # data, 3 x (d, deep), empty: each once
    assert r0["train"] == r1["train"] and r0["val"] == r1["val"]
    assert len(r0["train"]) == 11 and len(r0["val"]) == 1 and sorted(r0["train"] + r0["val"]) == list_images(data)
    assert r0["err"] == r1["err"] and "no image files" in r0["err"]
    assert "listed 12 images in 7 folders below" in proc.stdout


def test_fixed_mask_reconstruction_loss_is_repeatable_and_draws_no_rng():
    """The monitor's masks are fixed per image (seeded by --seed alone): the same model gives
    the same value at every call (so epochs compare), a subset order does not matter, and the
    global RNG a training run draws from is untouched."""
    import argparse
    import torch
    import models_mae
    from monitors.diagnostics import reconstruction_loss
    torch.manual_seed(0)
    model = models_mae.MODELS["mae_vit_tiny_patch16"](img_size=32, patch_size=4, nb_classes=1)
    data = [(torch.randn(3, 32, 32), -1) for _ in range(10)]
    args = argparse.Namespace(seed=0, mask_ratio=0.75, batch_size=4, num_workers=0, pin_mem=False)
    state = torch.get_rng_state()
    a, b = reconstruction_loss(model, data, "cpu", args), reconstruction_loss(model, data, "cpu", args)
    assert torch.equal(state, torch.get_rng_state()) and model.training
    assert a == b and 0.5 < a < 3  # unit-variance pixels: a random decoder's loss is about 1
    other = reconstruction_loss(model, data, "cpu", argparse.Namespace(**{**vars(args), "seed": 1}))
    assert other != a  # other masks, another value: the masks do come from the seed


@pytest.fixture(scope="module")
def unlabeled_run(tmp_path_factory):
    """2 epochs on a classless tree of 40 noise images, 8 held out, monitors every epoch."""
    from conftest import TINY, run_script
    root = tmp_path_factory.mktemp("unlabeled")
    data, out = root / "data", root / "out"
    for i in range(40):
        (data / f"s{i % 4}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (36, 40, 3), dtype=np.uint8)).save(
            data / f"s{i % 4}" / f"{i}.png")
    proc = run_script("main_pretrain.py", *TINY, "--epochs", "2", "--data_path", data, "--labels", "none",
                      "--holdout", "0.2", "--val_interval", "1", "--diag_images", "8", "--vis_every", "1",
                      "--output_dir", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return data, out, proc


def test_unlabeled_tree_logs_label_free_monitors_every_eval_epoch(unlabeled_run):
    """log.txt and TensorBoard have, per epoch, the held-out images' fixed-mask reconstruction
    loss (near the training loss), effective rank, uniformity and TCR, all finite; the
    reconstruction pictures are written."""
    import json
    import math
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    _, out, proc = unlabeled_run
    stats = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [s["epoch"] for s in stats] == [0, 1]
    keys = ("diag_recon_loss", "diag_effective_rank", "diag_uniformity", "diag_tcr", "diag_dims99")
    for s in stats:
        assert all(math.isfinite(s[k]) for k in keys), s
        assert 0.3 < s["diag_recon_loss"] / s["train_loss_mae"] < 3, s  # the same loss on unseen images
        assert 1 <= s["diag_effective_rank"] <= 7 + 1e-6 and 0 < s["diag_uniformity"] <= 1
    assert "reconstruction loss" in proc.stdout and "(fixed masks)" in proc.stdout
    events = EventAccumulator(str(out)).Reload()
    for tag in ("diag/recon_loss", "diag/effective_rank", "diag/uniformity", "diag/tcr"):
        assert [e.step for e in events.Scalars(tag)] == [0, 1], tag
    assert events.Scalars("diag/recon_loss")[-1].value == pytest.approx(stats[-1]["diag_recon_loss"])
    assert (out / "reconstruction-0.png").is_file() and (out / "reconstruction-1.png").is_file()


def test_analyze_an_unlabeled_checkpoint_and_tree(unlabeled_run, tmp_path):
    """main_analyze.py --labels none: the label-free diagnostics and the reconstruction loss on
    the run's 8 held-out images (its --holdout, from the checkpoint), kNN and linear skipped
    with one line; the reconstruction loss is the pretraining monitor's value (same masks)."""
    import json
    from conftest import run_script
    data, out, _ = unlabeled_run
    proc = run_script("main_analyze.py", "--checkpoint", out / "checkpoint-1.pth", "--data_path", data,
                      "--labels", "none", "--num_workers", "0", "--batch_size", "4", "--output_dir", tmp_path,
                      "--out_json", tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("kNN and linear evaluation skipped (they need labels)") == 1
    assert "held out 8 of 40 images" in proc.stdout
    r = json.load(open(tmp_path / "r.json"))
    assert "knn" not in r and "linear" not in r and r["diagnostics"]["n"] == 8
    assert 1 <= r["diagnostics"]["effective_rank"] <= 7 + 1e-6
    last = json.loads((out / "log.txt").read_text().splitlines()[-1])
    assert r["recon_loss"] == pytest.approx(last["diag_recon_loss"], rel=1e-5)
    assert (tmp_path / "spectrum.png").is_file() and (tmp_path / "reconstruction-analysis.png").is_file()


def test_unlabeled_source_killed_and_relaunched_ends_at_the_uninterrupted_weights(tmp_path):
    """kill -9 twice mid-run (a checkpoint after every step, the label-free monitors every
    epoch) on a classless tree, relaunched with the same command: the final weights equal an
    uninterrupted run's bit for bit (the listing, the held-out split and the per-sample
    seeding do not depend on the restart)."""
    import signal
    from test_survival import RUN, assert_same_weights, final_model, kill_group, launch, wait_for_position
    data = tmp_path / "data"
    for i in range(72):  # 8 held out, 64 train: 4 steps of 16 per epoch
        (data / f"s{i % 5}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (36, 40, 3), dtype=np.uint8)).save(
            data / f"s{i % 5}" / f"{i}.png")
    extra = ["--data_path", data, "--labels", "none", "--holdout", "0.11", "--val_interval", "1",
             "--diag_images", "8"]
    ref = launch(tmp_path / "ref", *extra)
    stdout, err = ref.communicate(timeout=600)
    assert ref.returncode == 0, err[-2000:]
    assert "held out 8 of 72 images" in stdout and "4 steps/epoch" in stdout
    out = tmp_path / "killed"
    for target in ((0, 2), (1, 1)):
        proc = launch(out, *extra)
        wait_for_position(proc, out, target)
        kill_group(proc, signal.SIGKILL)
        assert not (out / "checkpoint-1.pth").exists()  # killed before the end
    proc = launch(out, *extra)
    stdout, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    assert "resumed from" in stdout
    assert_same_weights(final_model(tmp_path / "ref"), final_model(out))


def test_one_held_out_image_logs_the_reconstruction_loss_not_a_traceback(tmp_path):
    """The default --holdout 0.01 of a 20-image tree holds out 1 image: the pretraining
    monitors log its reconstruction loss and say why the feature diagnostics are left out
    (they need 2); main_analyze on it is one error line naming --holdout."""
    import json
    import math
    from conftest import TINY, assert_one_line_error, run_script
    data = tmp_path / "data"
    data.mkdir()
    for i in range(20):
        Image.new("RGB", (40, 36), (i * 9, 50, 100)).save(data / f"{i}.png")
    out = tmp_path / "out"
    proc = run_script("main_pretrain.py", *TINY, "--data_path", data, "--labels", "none", "--val_interval", "1",
                      "--output_dir", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "held out 1 of 20 images" in proc.stdout and "need 2 or more (raise --holdout)" in proc.stdout
    stats = json.loads((out / "log.txt").read_text().splitlines()[-1])
    assert math.isfinite(stats["diag_recon_loss"]) and "diag_effective_rank" not in stats
    proc = run_script("main_analyze.py", "--checkpoint", out / "checkpoint-0.pth", "--data_path", data,
                      "--labels", "none", "--num_workers", "0", "--output_dir", tmp_path)
    assert_one_line_error(proc, "1 val image", "raise --holdout")


def test_probe_data_gives_knn_accuracy_while_pretraining_unlabeled(tmp_path):
    """--probe_data: a small labelled ImageFolder beside an unlabeled --data_path gives kNN and
    linear top-1/top-5 on its val split every eval epoch (log.txt probe_knn_* and
    probe_linear_*, TensorBoard probe/),
    the online classifier staying off; a probe folder without class folders is one line."""
    import json
    from conftest import TINY, assert_one_line_error, run_script
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    data, probe = tmp_path / "data", tmp_path / "probe"
    data.mkdir()
    for i in range(20):
        Image.new("RGB", (40, 36), (i * 9, 50, 100)).save(data / f"{i}.png")
    for split, n in (("train", 6), ("val", 3)):
        for c, colour in (("red", (220, 20, 20)), ("blue", (20, 20, 220))):
            (probe / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (40, 36), tuple(v + 5 * i for v in colour)).save(probe / split / c / f"{i}.png")
    out = tmp_path / "out"
    args = [*TINY, "--data_path", data, "--labels", "none", "--holdout", "0.2", "--val_interval", "1",
            "--diag_images", "4", "--output_dir", out]
    proc = run_script("main_pretrain.py", *args, "--probe_data", probe)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "on 6 val images, bank and fit on 12 train images, 2 classes" in proc.stdout
    stats = json.loads((out / "log.txt").read_text().splitlines()[-1])
    assert 0 <= stats["probe_knn_acc1"] <= stats["probe_knn_acc5"] == 100  # 2 classes: top-5 holds both
    assert stats["probe_linear_acc1"] == 100  # red and blue: one linear direction
    assert not any("loss_ce" in k or "online" in k for k in stats)
    events = EventAccumulator(str(out)).Reload()
    for name in ("knn_acc1", "linear_acc1", "linear_acc5"):
        assert events.Scalars(f"probe/{name}")[-1].value == pytest.approx(stats[f"probe_{name}"])
    bad = run_script("main_pretrain.py", *args[:-1], tmp_path / "out2", "--probe_data", data)
    assert_one_line_error(bad, f"--probe_data {data} needs labels")


def test_listing_prints_a_running_count_and_its_time(tmp_path):
    """A long walk says it is alive: with the period at 0 every folder reports the running
    count; the end gives the total and the time."""
    import io
    make_mixed_tree(tmp_path)
    out = io.StringIO()
    list_images(tmp_path, progress_s=0, out=out)
    # an earlier test in this process may have installed the time-stamping print (util.dist)
    lines = [re.sub(r"^\[\d\d:\d\d:\d\d\] ", "", line) for line in out.getvalue().splitlines()]
    assert lines[0] == f"listing {tmp_path}: 1 images in 1 folders so far (0 s)"  # deep16.png at the top
    assert [line.split(": ")[1].split(" (")[0] for line in lines[1:-1]] == [
        "2 images in 2 folders so far", "3 images in 3 folders so far", "6 images in 4 folders so far"]
    assert lines[-1].startswith(f"listed 6 images in 4 folders below {tmp_path} in ")


def test_file_lists_with_spaces_duplicates_and_labels_under_labels_none(tmp_path):
    from util.sources import read_file_list
    data = tmp_path / "photos 2024"
    data.mkdir()
    for i in range(6):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(data / f"img {i}.png")
    lines = [f"photos 2024/img {i}.png {i % 2}" for i in range(6)]
    (tmp_path / "list.txt").write_text("\n".join(lines + lines[:2]) + "\n")  # two joined lists overlap
    paths, labels = read_file_list(str(tmp_path / "list.txt"))
    assert paths == [str(data / f"img {i}.png") for i in range(6)] and labels == [0, 1, 0, 1, 0, 1]
    (tmp_path / "bad.txt").write_text("photos 2024/img 0.png cat\n")
    with pytest.raises(UserError, match="expected 'path \\[integer label\\]'"):
        read_file_list(str(tmp_path / "bad.txt"))
    (tmp_path / "clash.txt").write_text(lines[0] + "\n" + lines[0][:-1] + "1\n")
    with pytest.raises(UserError, match="listed again with another label"):
        read_file_list(str(tmp_path / "clash.txt"))
    # --labels none on a labelled list: its labels go unused (they trained the online head before)
    proc = run_script("main_pretrain.py", *TINY, "--input_size", "16", "--batch_size", "2", "--data_path",
                      tmp_path / "list.txt", "--labels", "none", "--holdout", "0.3", "--output_dir", tmp_path / "o")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "names 2 files again: each is kept once" in proc.stdout
    assert "unlabeled data: online classifier off" in proc.stdout and "loss_ce:" not in proc.stdout
    assert "held out 2 of 6 images" in proc.stdout


def test_a_link_loop_lists_each_image_once(tmp_path):
    from util.sources import list_images
    (tmp_path / "sub").mkdir()
    for i in range(5):
        Image.new("RGB", (8, 8)).save(tmp_path / "sub" / f"{i}.png")
    os.symlink("..", tmp_path / "sub" / "up")  # 410 names (each file 82 times) before
    assert len(list_images(str(tmp_path))) == 5


def test_holdout_outside_0_1_and_a_flat_folder_without_labels_none_are_one_line(tmp_path):
    for bad in ("-0.5", "2"):
        proc = run_script("main_pretrain.py", *TINY, "--holdout", bad, "--output_dir", tmp_path / "o")
        assert_one_line_error(proc, f"--holdout {float(bad)}: a fraction between 0 and 1")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    proc = run_script("main_pretrain.py", *TINY, "--data_path", tmp_path, "--output_dir", tmp_path / "o")
    assert_one_line_error(proc, "images without class folders: use --labels none")


def test_a_non_image_file_is_named_plainly_also_from_a_loader_worker(tmp_path):
    from util.errors import BadImage, _one_line
    (tmp_path / "notes.jpg").write_text("not a picture")
    with pytest.raises(BadImage) as e:
        any_mode_loader(str(tmp_path / "notes.jpg"))
    assert str(e.value) == f"cannot read image {tmp_path / 'notes.jpg'}: not an image file PIL can identify"
    # as a worker's exception reaches the main process (it printed 'util.errors.BadImage: ...')
    worker = RuntimeError(f"Caught BadImage in DataLoader worker process 1.\nOriginal Traceback (most recent call "
                          f"last):\n  File \"x.py\", line 1, in f\nutil.errors.BadImage: {e.value}")
    assert _one_line(worker) == str(e.value)


@pytest.mark.parametrize("flags", [[], ["--fast_decode", "false"], ["--gpu_decode"]])
def test_a_text_file_named_jpg_is_named_plainly_on_every_training_decode_path(tmp_path, flags):
    """PIL's own text names a BytesIO object ('cannot identify image file <_io.BytesIO object
    at 0x...>'): every decode path says what the file is instead."""
    data = tmp_path / "d"
    for c in ("a", "b"):
        (data / "train" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 36), (i * 60, 90, 30)).save(data / "train" / c / f"{i}.jpg")
    (data / "train" / "b" / "notes.jpg").write_text("not a picture")
    proc = run_script("main_pretrain.py", *TINY, "--data_path", data, "--batch_size", "7", *flags,
                      "--output_dir", tmp_path / "o")
    assert_one_line_error(proc, f"cannot read image {data / 'train' / 'b' / 'notes.jpg'}: "
                                "not an image file PIL can identify")


@pytest.mark.parametrize("ranks", [1, 2])
def test_skip_bad_images_leaves_a_bad_held_out_image_out_of_the_evaluation(tmp_path, ranks):
    """A truncated JPEG in the held-out split (not in train): with --skip_bad_images the run
    ends, saying once that 1 val image is left out (named; found by whichever rank read it),
    and the monitors count the 3 images evaluated; without the flag it is one error line."""
    import json
    from conftest import TINY, assert_one_line_error, run_script
    data = tmp_path / "d"
    data.mkdir()
    names = [f"{i:02d}.jpg" for i in range(20)]
    for i, name in enumerate(names):
        Image.new("RGB", (40, 40), (i * 12, 255 - i * 12, 99)).save(data / name)
    bad = data / names[holdout_split(names, 0.2)[1][0]]  # the split is fixed: this one is held out
    bad.write_bytes(bad.read_bytes()[:150])
    flags = [*TINY, "--batch_size", str(16 // ranks), "--data_path", data, "--labels", "none", "--holdout", "0.2",
             "--val_interval", "1", "--diag_images", "8", "--vis_every", "1"]
    proc = run_script("main_pretrain.py", *flags, "--skip_bad_images", "--output_dir", tmp_path / "a", torchrun=ranks)
    assert proc.returncode == 0, proc.stderr[-2000:]
    said = [line for line in proc.stdout.splitlines() if "unreadable val images" in line]
    assert len(said) == 1 and "skipped 1 unreadable val images of 4" in said[0] \
        and f"first cannot read image {bad}" in said[0], proc.stdout
    assert "(on 3 val images)" in proc.stdout
    stats = json.loads((tmp_path / "a" / "log.txt").read_text().splitlines()[-1])
    assert stats["train_skipped_images"] == 0 and np.isfinite(stats["diag_recon_loss"])
    if ranks == 1:  # the error path is the same at any world size
        assert_one_line_error(run_script("main_pretrain.py", *flags, "--output_dir", tmp_path / "b"),
                              f"cannot read image {bad}")


def test_probe_data_without_val_holds_out_its_train_images(tmp_path):
    """--probe_data with train/<class>/ and no val/: --holdout of its train images (sorted
    names, not stratified) is its val split, stated as for --data_path, and the probe numbers
    come; class folders without train/ are one line that does not name --data_path."""
    import json
    from conftest import TINY, assert_one_line_error, run_script
    data, probe = tmp_path / "data", tmp_path / "probe"
    data.mkdir()
    for i in range(20):
        Image.new("RGB", (40, 36), (i * 9, 50, 100)).save(data / f"{i}.png")
    for c, colour in (("red", (220, 20, 20)), ("blue", (20, 20, 220))):
        (probe / "train" / c).mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (40, 36), tuple(v + 5 * i for v in colour)).save(probe / "train" / c / f"{i}.png")
    args = [*TINY, "--batch_size", "8", "--data_path", data, "--labels", "none", "--holdout", "0.25",
            "--val_interval", "1", "--diag_images", "4"]
    proc = run_script("main_pretrain.py", *args, "--output_dir", tmp_path / "out", "--probe_data", probe)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "held out 5 of 20 images" in proc.stdout and "held out 4 of 16 images" in proc.stdout
    assert "on 4 val images, bank and fit on 12 train images, 2 classes" in proc.stdout
    assert "probe on 4 --probe_data val images: kNN" in proc.stdout
    stats = json.loads((tmp_path / "out" / "log.txt").read_text().splitlines()[-1])
    assert stats["probe_linear_acc1"] == 100 and stats["probe_knn_acc5"] == 100
    bad = run_script("main_pretrain.py", *args, "--output_dir", tmp_path / "out2", "--probe_data", probe / "train")
    assert_one_line_error(bad, f"--probe_data {probe / 'train'} needs labels", "train does not exist")
    assert "data_path" not in bad.stderr.replace("--probe_data", "")
