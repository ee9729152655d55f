"""The fast training-image path (util/jpeg.py, the default --fast_decode): the same crop
boxes as torchvision's RandomResizedCrop, pixels close to the plain PIL path, odd files."""
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import functional as F

from conftest import assert_one_line_error, run_and_resume_after_epoch0, run_script
from util.datasets import EpochSeeded, checked_loader
from util.errors import UserError
from util.jpeg import DecodeCrop, EncodedImage, dct_scale

BICUBIC = transforms.InterpolationMode.BICUBIC


def photo(width, height, seed=0):
    """A photo-like RGB image: smooth colour fields from coarse to fine, plus grain."""
    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), 127.5)
    for cells, amp in ((3, 0.8), (12, 0.4), (max(width // 8, 2), 0.25)):
        small = Image.fromarray(rng.integers(0, 255, (cells, cells, 3), dtype=np.uint8))
        img += (np.asarray(small.resize((width, height), Image.BICUBIC), dtype=float) - 127.5) * amp
    img += rng.normal(0, 4, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def save(img, path, **kw):
    img.save(path, **({"format": "JPEG", "quality": 95} | kw))
    return str(path)


def plain(crop, path, seed):
    """The plain path's crop of `path` (PIL decode, RandomResizedCrop) as uint8 (3, H, W)."""
    torch.manual_seed(seed)
    return F.pil_to_tensor(crop(checked_loader(path))).int()


def fast(crop, path, seed):
    torch.manual_seed(seed)
    return DecodeCrop(crop)(path).int()


# ---- crop boxes ---------------------------------------------------------------------
def ramp_jpeg(path, width=512, height=384):
    """R grows with x and G with y (0..255), so a crop's pixels tell where it was taken."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    rgb = np.stack([x, y, np.full_like(x, 128)], -1).round().astype(np.uint8)
    return save(Image.fromarray(rgb), path, subsampling=0)


def box_of(out, width, height):
    """(centre x, centre y, width, height) of the box a crop came from, in source pixels,
    and whether it was flipped, from a ramp_jpeg crop; away from the borders, where the
    resampling filter is cut off, the crop of a ramp is a ramp."""
    r, g = out[0].double().mean(0), out[1].double().mean(1)
    cols = torch.arange(3, len(r) - 3, dtype=torch.float64)

    def line(v, n_src):  # source coordinate per output pixel: slope and centre
        slope = torch.linalg.lstsq(torch.stack([cols, torch.ones_like(cols)], 1), v[3:-3, None]).solution
        a, b = slope[0, 0] * (n_src - 1) / 255, slope[1, 0] * (n_src - 1) / 255
        return a, a * (len(v) - 1) / 2 + b

    ax, cx = line(r, width)
    ay, cy = line(g, height)
    return cx.item(), cy.item(), abs(ax.item()) * len(r), ay.item() * len(g), ax.item() < 0


def ks_distance(a, b):
    """Two-sample Kolmogorov-Smirnov statistic."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    return np.abs(np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b)).max()


@pytest.mark.parametrize("width,height,size", [(256, 192, 112), (512, 384, 48)])  # 48: all at 1/2..1/8
def test_crop_boxes_follow_torchvisions_distribution(tmp_path, width, height, size):
    """Boxes of the fast path (seeds 0..n-1) against torchvision's RandomResizedCrop on the
    decoded image (other seeds): area, aspect ratio, position and flips, measured from the
    pixels of both outputs the same way."""
    path = ramp_jpeg(tmp_path / "ramp.jpg", width, height)
    crop = transforms.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=BICUBIC)
    flip = transforms.RandomHorizontalFlip()
    decoded, n = checked_loader(path), 500
    ours, theirs = [], []
    for seed in range(n):
        torch.manual_seed(seed)
        ours.append(box_of(flip(DecodeCrop(crop)(path)), width, height))
        torch.manual_seed(n + seed)
        theirs.append(box_of(F.pil_to_tensor(flip(crop(decoded))), width, height))
    ours, theirs = np.array(ours), np.array(theirs)
    features = {"area": lambda b: b[:, 2] * b[:, 3] / (width * height), "log aspect": lambda b: np.log(b[:, 2] / b[:, 3]),
                "centre x": lambda b: b[:, 0], "centre y": lambda b: b[:, 1]}
    limit = 1.95 * math.sqrt(2 / n)  # KS critical value at alpha 0.001 (fixed seeds: deterministic)
    for name, feature in features.items():
        assert ks_distance(feature(ours), feature(theirs)) < limit, name
    assert abs(ours[:, 4].mean() - 0.5) < 0.08 and abs(theirs[:, 4].mean() - 0.5) < 0.08
    # the estimate itself: both paths cover the whole image at scale 1 and ratio 4/3
    torch.manual_seed(0)
    whole = transforms.RandomResizedCrop(size, scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3), interpolation=BICUBIC)
    cx, cy, w, h, _ = box_of(DecodeCrop(whole)(path), width, height)
    assert abs(cx - (width - 1) / 2) < 3 and abs(cy - (height - 1) / 2) < 3
    assert abs(w - width) < 8 and abs(h - height) < 8


def test_same_seed_same_box_as_the_plain_path(tmp_path):
    """Under one seed (EpochSeeded's) both paths draw the same box and the same flip."""
    path = save(photo(200, 150), tmp_path / "a.jpg")
    crop = transforms.RandomResizedCrop(64, scale=(0.2, 1.0), interpolation=BICUBIC)
    boxes = []
    for seed in range(20):
        torch.manual_seed(seed)
        boxes.append(crop.get_params(Image.open(path), crop.scale, crop.ratio))
    seen = []

    class Spy(transforms.RandomResizedCrop):
        @staticmethod
        def get_params(img, scale, ratio):
            seen.append(transforms.RandomResizedCrop.get_params(img, scale, ratio))
            return seen[-1]

    for seed in range(20):
        torch.manual_seed(seed)
        DecodeCrop(Spy(64, scale=(0.2, 1.0), interpolation=BICUBIC))(path)
    assert seen == boxes and len(set(boxes)) > 15


# ---- pixels -------------------------------------------------------------------------
def test_full_scale_output_matches_the_plain_path(tmp_path):
    """Boxes smaller than twice the output are decoded at full size: then the only
    difference is torch's vectorised bicubic against PIL's, at most 2 levels of 255."""
    path = save(photo(200, 150), tmp_path / "a.jpg")
    crop = transforms.RandomResizedCrop(96, scale=(0.2, 1.0), interpolation=BICUBIC)
    for seed in range(20):
        want, got = plain(crop, path, seed), fast(crop, path, seed)
        assert got.shape == want.shape == (3, 96, 96)
        diff = (got - want).abs().float()
        assert diff.max() <= 2 and diff.mean() < 0.05, (seed, diff.max(), diff.mean())


def test_dct_scale_only_when_the_box_keeps_the_output_size():
    assert dct_scale(447, 600, 224, 224) == 1
    assert dct_scale(448, 448, 224, 224) == 2
    assert dct_scale(895, 1000, 224, 224) == 2 and dct_scale(896, 896, 224, 224) == 4
    assert dct_scale(1792, 1792, 224, 224) == 8 and dct_scale(6000, 6000, 224, 224) == 8
    assert dct_scale(500, 300, 224, 224) == 1 and dct_scale(300, 399, 100, 200) == 1
    assert dct_scale(300, 400, 100, 200) == 2  # (height, width) of box and output


def test_reduced_decode_is_close_to_the_full_decode(tmp_path, monkeypatch):
    """A box of at least 2x the output is decoded at 1/2 (1/4, 1/8) scale: never below the
    output size, and within 4 levels of 255 on average of the full decode resized with
    PIL's bicubic over the same box (rounded outwards to the reduced pixel grid)."""
    path = save(photo(800, 640), tmp_path / "big.jpg")
    crop = transforms.RandomResizedCrop(112, scale=(0.2, 1.0), interpolation=BICUBIC)
    decoded, full = [], checked_loader(path)
    real_decode = EncodedImage.decode

    def recorded_decode(self, s):
        decoded.append(real_decode(self, s))
        return decoded[-1]

    monkeypatch.setattr(EncodedImage, "decode", recorded_decode)
    scales = set()
    for seed in range(20):
        torch.manual_seed(seed)
        top, left, h, w = crop.get_params(full, crop.scale, crop.ratio)
        s = dct_scale(h, w, 112, 112)
        got = fast(crop, path, seed)
        pixels, used = decoded[-1]
        assert used == s and pixels.shape == (math.ceil(640 / s), math.ceil(800 / s), 3)
        assert math.ceil((top + h) / s) - top // s >= 112 and math.ceil((left + w) / s) - left // s >= 112
        box = (s * (left // s), s * (top // s), min(s * math.ceil((left + w) / s), 800),
               min(s * math.ceil((top + h) / s), 640))
        want = F.pil_to_tensor(full.crop(box).resize((112, 112), Image.BICUBIC)).int()
        assert (got - want).abs().float().mean() < 4, (seed, s)
        scales.add(s)
    assert scales == {2, 4}


# ---- odd files ----------------------------------------------------------------------
def test_grayscale_cmyk_and_png_named_jpeg(tmp_path):
    """As the plain path, which converts to RGB first: grey gives three equal channels."""
    img = photo(120, 90)
    paths = {"grey": save(img.convert("L"), tmp_path / "grey.JPEG"),
             "cmyk": save(img.convert("CMYK"), tmp_path / "cmyk.JPEG"),
             "png": str(tmp_path / "png.JPEG")}
    img.save(paths["png"], format="PNG")
    assert Image.open(paths["cmyk"]).mode == "CMYK" and Image.open(paths["png"]).format == "PNG"
    crop = transforms.RandomResizedCrop(48, scale=(0.2, 1.0), interpolation=BICUBIC)
    for name, path in paths.items():
        for seed in range(5):
            want, got = plain(crop, path, seed), fast(crop, path, seed)
            assert got.shape == (3, 48, 48)
            assert (got - want).abs().max() <= 2, name
        if name == "grey":
            assert torch.equal(got[0], got[1]) and torch.equal(got[0], got[2])


@pytest.mark.parametrize("content", ["truncated", "garbage", "empty"])
def test_a_bad_file_is_named(tmp_path, content):
    path = tmp_path / "bad.JPEG"
    raw = open(save(photo(120, 90), tmp_path / "good.jpg"), "rb").read()
    path.write_bytes({"truncated": raw[:len(raw) // 2], "garbage": b"not an image", "empty": b""}[content])
    crop = transforms.RandomResizedCrop(32, interpolation=BICUBIC)
    with pytest.raises(UserError, match=r"cannot read image .*bad\.JPEG"):
        DecodeCrop(crop)(str(path))
    with pytest.raises(UserError, match=r"cannot read image .*bad\.JPEG"):
        checked_loader(str(path))  # the plain path refuses the same files


def test_pil_output_for_timm_transforms(tmp_path):
    path = save(photo(120, 90), tmp_path / "a.jpg")
    crop = transforms.RandomResizedCrop(40, interpolation=BICUBIC)
    torch.manual_seed(0)
    img = DecodeCrop(crop, pil=True)(path)
    assert img.mode == "RGB" and img.size == (40, 40)
    assert torch.equal(F.pil_to_tensor(img), fast(crop, path, 0).to(torch.uint8))
    with pytest.raises(ValueError):
        DecodeCrop(transforms.RandomResizedCrop(40, interpolation=transforms.InterpolationMode.NEAREST))


# ---- loaders of the three entry points ------------------------------------------------
def jpeg_folder(root, per_class=4, size=(60, 45)):
    for split in ("train", "val"):
        for c, cls in enumerate(("a", "b")):
            os.makedirs(root / split / cls, exist_ok=True)
            for i in range(per_class):
                save(photo(*size, seed=10 * c + i), root / split / cls / f"{i}.JPEG")
    img = photo(*size, seed=99)  # the odd files of real data sets
    save(img.convert("L"), root / "train" / "a" / "grey.JPEG")
    save(img.convert("CMYK"), root / "train" / "b" / "cmyk.JPEG")
    img.save(root / "train" / "b" / "png.JPEG", format="PNG")
    return str(root)


def assert_close_batches(fast_loader, plain_loader, mean, worst=None, epochs=(0, 2)):
    assert len(fast_loader) == len(plain_loader) > 0
    for epoch in epochs:
        fast_loader.sampler.set_epoch(epoch)
        plain_loader.sampler.set_epoch(epoch)
        for (got, t_got, *s_got), (want, t_want, *s_want) in zip(fast_loader, plain_loader):
            assert torch.equal(t_got, t_want)  # same order and labels
            assert len(s_got) == len(s_want) and all(torch.equal(a, b) for a, b in zip(s_got, s_want))  # mask noise
            assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape
            diff = (got - want).abs() * 0.226 * 255  # in levels of 255
            assert diff.mean() < mean, (epoch, diff.mean())
            if worst is not None:
                assert diff.max() < worst, (epoch, diff.max())


def test_pretrain_loader_default_is_fast_and_matches_the_plain_one(tmp_path, tiny_args):
    from main_pretrain import build_train_loader, get_args_parser
    args = get_args_parser().parse_args(tiny_args + ["--data_path", jpeg_folder(tmp_path), "--batch_size", "4"])
    assert args.fast_decode
    fast_loader = build_train_loader(args, torch.device("cpu"))
    assert isinstance(fast_loader.loader.dataset.dataset.loader, DecodeCrop)
    args.fast_decode, args.nb_classes = False, None
    plain_loader = build_train_loader(args, torch.device("cpu"))
    assert isinstance(plain_loader.dataset.dataset.transform, transforms.Compose)
    assert next(iter(fast_loader.loader))[0].dtype == torch.uint8  # the workers send uint8
    assert_close_batches(fast_loader, plain_loader, mean=0.05, worst=3)


def test_synthetic_data_keeps_the_plain_path(tiny_args):
    from main_pretrain import build_train_loader, get_args_parser
    args = get_args_parser().parse_args(tiny_args)
    loader = build_train_loader(args, torch.device("cpu"))
    assert isinstance(loader, torch.utils.data.DataLoader)


def test_linprobe_and_finetune_loaders(tmp_path):
    from eval_setup import build_data, linprobe_transform
    from main_finetune import get_args_parser, train_transform
    data = jpeg_folder(tmp_path)
    args = get_args_parser().parse_args(["--data_path", data, "--input_size", "32", "--batch_size", "4",
                                         "--num_workers", "0", "--output_dir", str(tmp_path / "o")])
    for make, mean in ((lambda a: linprobe_transform(a.input_size), 0.05), (train_transform, 0.2)):
        args.fast_decode, args.nb_classes = True, None
        fast_data = build_data(args, make(args))
        assert isinstance(fast_data.train.loader, DecodeCrop)
        args.fast_decode, args.nb_classes = False, None
        plain_data = build_data(args, make(args))
        # fine-tuning: RandAugment and RandomErasing draw the same ops from the same seed,
        # on images 2 levels apart at most; a few thresholded ops amplify that locally
        assert_close_batches(fast_data.train_loader, plain_data.train_loader, mean=mean)


def test_pretraining_on_files_resumes_exactly(tmp_path, tiny_args):
    data = jpeg_folder(tmp_path / "data")
    common = tiny_args + ["--data_path", data, "--batch_size", "4", "--epochs", "2", "--save_every", "1"]
    full, resumed = run_and_resume_after_epoch0(tmp_path, common)
    assert all(torch.equal(full["model"][k], resumed["model"][k]) for k in full["model"])


def test_a_corrupt_training_file_is_one_line(tmp_path, tiny_args):
    data = jpeg_folder(tmp_path / "data")
    bad = tmp_path / "data" / "train" / "a" / "3.JPEG"
    bad.write_bytes(bad.read_bytes()[:200])
    proc = run_script("main_pretrain.py", *tiny_args, "--data_path", data, "--batch_size", "4",
                      "--num_workers", "1", "--output_dir", tmp_path / "out")  # raised in a worker
    assert_one_line_error(proc, "cannot read image", "3.JPEG")


def test_epoch_seeded_fast_samples_do_not_depend_on_the_order(tmp_path):
    """Each sample's crop comes from its own (seed, epoch, index) generator."""
    from util.datasets import SubsetImageFolder
    root = jpeg_folder(tmp_path)
    crop = transforms.RandomResizedCrop(24, interpolation=BICUBIC)
    ds = EpochSeeded(SubsetImageFolder(os.path.join(root, "train"), transforms.RandomHorizontalFlip(),
                                       loader=DecodeCrop(crop)), seed=3)
    first = [ds[(1, i)][0] for i in range(len(ds.dataset))]
    again = [ds[(1, i)][0] for i in reversed(range(len(ds.dataset)))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(ds[(1, 0)][0], ds[(2, 0)][0])


# ---- the train sampler's global batches and per-sample masks (resume on another world size) ----
def sampler_batches(n, batch_size, world, epoch, start_step=0, accum_iter=1):
    """Each rank's TrainSampler batches, as a world of `world` processes would see them."""
    from util.datasets import TrainSampler
    out = []
    for rank in range(world):
        s = TrainSampler(range(n), batch_size, seed=7, accum_iter=accum_iter)
        s.rank, s.world = rank, world
        s.set_epoch(epoch)
        s.start_index = start_step * batch_size
        keys = list(s)
        assert len(keys) == len(s) and all(e == epoch for e, _ in keys)
        out.append([[i for _, i in keys[j:j + batch_size]] for j in range(0, len(keys), batch_size)])
    return out


def test_train_sampler_global_batches_do_not_depend_on_the_world_size():
    one = sampler_batches(70, 4, 1, epoch=3)[0]  # 17 steps of 4; the last 2 samples dropped
    two = sampler_batches(70, 4, 2, epoch=3)  # 8 steps of 2 x 4
    assert len(one) == 17 and len(two[0]) == len(two[1]) == 8
    for k in range(8):  # global batch k at 2 processes = steps 2k, 2k+1 at one
        assert two[0][k] + two[1][k] == one[2 * k] + one[2 * k + 1]
    assert sorted(sum(one, [])) == sorted(set(sum(one, [])))  # no sample twice
    # a resume at step 3 of 2 processes continues where step 6 of one process does
    resumed = sampler_batches(70, 4, 2, epoch=3, start_step=3)
    assert [a + b for a, b in zip(*resumed)] == [a + b for a, b in zip(one[6::2], one[7::2])]
    assert one != sampler_batches(70, 4, 1, epoch=4)[0]  # reshuffled per epoch


@pytest.mark.parametrize("n", [97, 71])  # primes: no batch divides them
def test_train_sampler_updates_per_epoch_depend_only_on_the_effective_batch(n):
    """Effective batch 24 as 4 x accum 6 x 1, 4 x accum 3 x 2 and 4 x accum 2 x 3 processes:
    the same whole updates (n // 24), each the same 24 samples; the rest are left out."""
    updates = {}
    for world, accum in ((1, 6), (2, 3), (3, 2)):
        ranks = sampler_batches(n, 4, world, epoch=1, accum_iter=accum)
        assert all(len(r) == n // 24 * accum for r in ranks)
        steps = [sum((r[k] for r in ranks), []) for k in range(len(ranks[0]))]  # global batch k
        updates[world] = [sorted(sum(steps[u * accum:(u + 1) * accum], [])) for u in range(n // 24)]
    assert updates[1] == updates[2] == updates[3] and all(len(u) == 24 for u in updates[1])
    resumed = sampler_batches(n, 4, 3, epoch=1, start_step=2, accum_iter=2)  # at update 1, on 3 processes
    assert sorted(sum((sum(r[:2], []) for r in resumed), [])) == updates[1][1]


def test_train_sampler_plan_is_stated():
    from util.datasets import TrainSampler
    s = TrainSampler(range(97), 4, seed=0, accum_iter=6)
    assert s.describe() == ("24 steps/epoch, 4 updates of 24 images (1 of 97 images, a different draw each "
                            "epoch, left out: short of an effective batch)")


def test_mask_noise_follows_the_sample_and_keeps_maes_masking():
    from models_mae import MaskedAutoencoderViT
    from util.datasets import SyntheticImages, mask_noise
    crop = transforms.Compose([transforms.RandomResizedCrop(8), transforms.ToTensor()])
    ds = EpochSeeded(SyntheticImages(4, image_size=16, transform=crop), seed=5, mask_patches=16)
    _, target, noise = ds[(2, 1)]
    assert noise.shape == (16,) and target == ds.dataset[1][1]
    assert torch.equal(ds[(2, 1)][2], noise)  # the same mask wherever (rank, worker) the sample is loaded
    assert not torch.equal(ds[(3, 1)][2], noise) and not torch.equal(ds[(2, 2)][2], noise)
    assert torch.equal(ds[(2, 1)][0], EpochSeeded(ds.dataset, seed=5)[(2, 1)][0])  # the crops unchanged
    # MAE's masking statistics: the exact ratio per sample, every patch equally likely, samples independent
    noise = torch.stack([mask_noise(s, 16) for s in range(4000)])
    _, mask, _ = MaskedAutoencoderViT.random_masking(torch.zeros(4000, 16, 1), 0.75, noise)
    assert torch.all(mask.sum(1) == 12)
    assert (mask.mean(0) - 0.75).abs().max() < 0.03  # 4000 samples: 3 standard deviations ~0.02
    assert (mask[0::2] == mask[1::2]).all(1).float().mean() < 0.01


def test_num_workers_default_is_the_cores_per_local_process(monkeypatch):
    """16 cores, 1 GPU: 15 workers (min(8, cores) left half idle); 96 cores, 8 GPUs: 11 each
    (8 took 64 of 96); an srun task's affinity is its own share; explicit wins."""
    from types import SimpleNamespace

    from util.cli import resolve_num_workers
    for cores, env, want in ((16, {}, 15), (96, {"LOCAL_WORLD_SIZE": "8"}, 11), (2, {}, 1), (1, {}, 1),
                             (64, {"LOCAL_WORLD_SIZE": "1"}, 16), (10, {"SLURM_NTASKS": "8"}, 9)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
        args = SimpleNamespace(num_workers=None)
        line = resolve_num_workers(args, env)
        assert args.num_workers == want, (cores, env)
        assert line.startswith(f"loader workers: {want} per process ({cores} usable cores / "), line
    args = SimpleNamespace(num_workers=3)
    assert resolve_num_workers(args, {}) == "loader workers: 3 per process (--num_workers)" and args.num_workers == 3
