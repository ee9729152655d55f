"""util/sources.py: unlabeled trees, file lists, the held-out split and image modes."""
import re

import numpy as np
import pytest
import torch
from PIL import Image

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
