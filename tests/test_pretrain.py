"""End-to-end pretraining runs on synthetic data, resume, and bad input."""
import hashlib
import json
import os

import pytest
import torch
from PIL import Image

from conftest import assert_one_line_error, run_and_resume_after_epoch0, run_script
from util.accumulation import accumulation_plan
from main_pretrain import build_train_loader, get_args_parser


def read_log(out):
    with open(os.path.join(out, "log.txt")) as f:
        return [json.loads(line) for line in f]


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_short_run_loss_falls_and_writes_outputs(tmp_path, tiny_args):
    out = str(tmp_path / "run")
    proc = run_script("main_pretrain.py", *tiny_args, "--epochs", "4", "--synthetic_size", "128",
                      "--blr", "1e-3", "--reg", "tcr", "--lamb", "0.01", "--val_interval", "2",
                      "--vis_every", "4", "--save_every", "2", "--output_dir", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = read_log(out)
    assert [r["epoch"] for r in log] == [0, 1, 2, 3]
    assert log[-1]["train_loss_mae"] < log[0]["train_loss_mae"]
    for key in ("train_loss", "train_loss_reg", "train_loss_ce", "train_acc", "train_lr"):
        assert key in log[0]
    assert "val_online_acc1" in log[1] and "val_online_acc5" in log[3]
    files = set(os.listdir(out))
    assert {"checkpoint-1.pth", "checkpoint-3.pth", "reconstruction-3.png", "log.txt"} <= files
    assert any(f.startswith("events.out.tfevents") for f in files)
    state = torch.load(os.path.join(out, "checkpoint-3.pth"), weights_only=True)
    assert state["epoch"] == 3 and state["args"]["reg"] == "tcr"
    assert {"model", "optimizer", "scaler", "rng"} <= set(state)
    assert "eta:" in proc.stdout and "img_per_s" in proc.stdout


def test_resume_continues_exactly(tmp_path, tiny_args):
    common = [*tiny_args, "--epochs", "2", "--save_every", "1", "--reg", "uniformity", "--lamb", "0.1"]
    # a run that stopped after epoch 0: relaunching the same command auto-resumes
    a, b = run_and_resume_after_epoch0(tmp_path, common)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert read_log(tmp_path / "full")[1] == read_log(tmp_path / "cut")[0]


def test_accumulation_plan():
    S = accumulation_plan
    assert S(4, 2) == [(True, False, False, 2), (False, True, True, 2), (True, False, False, 2),
                       (False, True, True, 2)]
    # the all-reduce moves to a group's last step that runs; the loss is divided by the steps that run;
    # a fully skipped group has no all-reduce (and no gradient: nothing steps)
    assert [a.sync for a in S(6, 3, {2, 3, 4, 5})] == [False, True, False, False, False, False]
    assert [a.runs for a in S(6, 3, {1, 3, 4, 5})] == [2, 2, 2, 0, 0, 0]
    with pytest.raises(ValueError):
        S(5, 2)  # epochs are whole groups (TrainSampler)


def test_accum_iter_beyond_the_dataset_is_one_line(tmp_path, tiny_args):
    """64 images, effective batch 16 x 8: no whole update fits (the published code then never
    updated, silently); and a run whose epochs leave a short group trains only whole ones."""
    proc = run_script("main_pretrain.py", *tiny_args, "--accum_iter", "8", "--output_dir", tmp_path / "a")
    assert_one_line_error(proc, "64 images, fewer than one effective batch of 128", "--accum_iter 8")
    assert not os.path.exists(tmp_path / "a" / "checkpoint-0.pth")
    out = str(tmp_path / "b")
    proc = run_script("main_pretrain.py", *tiny_args, "--accum_iter", "3", "--warmup_epochs", "0",
                      "--output_dir", out)  # 4 steps of 16: one update of 48, the last 16 images left out
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "3 steps/epoch, 1 updates of 48 images (16 of 64 images" in proc.stdout
    trained = torch.load(os.path.join(out, "checkpoint-0.pth"), weights_only=True)
    assert [s["step"] for s in trained["optimizer"]["state"].values()][0] == 1


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(tmp_path, tiny_args):
    out = str(tmp_path / "nan")
    ok = run_script("main_pretrain.py", *tiny_args, "--save_every", "1", "--output_dir", out)
    assert ok.returncode == 0
    before = digest(os.path.join(out, "checkpoint-0.pth"))
    # resumes at epoch 1 step 0, so this process's step 1 is epoch 1 step 1
    proc = run_script("tests/inject_nonfinite.py", "1", "main_pretrain.py", *tiny_args, "--epochs", "2",
                      "--save_every", "1", "--output_dir", out)
    assert_one_line_error(proc, "non-finite loss", "epoch 1 step 1")
    assert digest(os.path.join(out, "checkpoint-0.pth")) == before
    assert not os.path.exists(os.path.join(out, "checkpoint-1.pth"))


def test_centering_is_a_real_boolean():
    p = get_args_parser()
    assert p.parse_args(["--centering", "False"]).centering is False
    assert p.parse_args(["--centering", "True"]).centering is True
    assert p.parse_args(["--centering"]).centering is True
    assert p.parse_args([]).centering is False
    assert p.parse_args(["--local-rank", "3"]).local_rank == 3
    assert p.parse_args(["--local_rank", "2"]).local_rank == 2


def test_published_reg_spellings(tmp_path, tiny_args):
    proc = run_script("main_pretrain.py", *tiny_args, "--reg", "TCR", "--lamb", "0.01",
                      "--output_dir", str(tmp_path / "o"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert '"reg": "tcr"' in proc.stdout


def make_image_folder(root, classes=("a", "b"), per_class=2, bad=None, empty_class=None):
    for split in ("train", "val"):
        for c in classes:
            d = os.path.join(root, split, c)
            os.makedirs(d, exist_ok=True)
            if c == empty_class:
                continue
            for i in range(per_class):
                Image.new("RGB", (40, 40), (i * 40, 100, 200)).save(os.path.join(d, f"{i}.png"))
    if bad:
        with open(os.path.join(root, "train", classes[0], "broken.jpg"), "wb") as f:
            f.write(b"this is not a jpeg")


BAD_INPUTS = [
    (["--data_path", "/nonexistent/path"], "does not exist"),
    (["--input_size", "30"], "not divisible"),
    (["--mask_ratio", "1.0"], "--mask_ratio"),
    (["--mask_ratio", "-0.1"], "--mask_ratio"),
    (["--reg", "entropy"], "unknown --reg"),
    (["--lamb", "-1"], "--lamb"),
    (["--resume", "/nonexistent/ckpt.pth"], "does not exist"),
    (["--model", "mae_vit_gigantic"], "unknown --model"),
    (["--centering", "maybe"], "boolean"),
    (["--gpu_decode"], "--gpu_decode needs an ImageFolder"),
]


@pytest.mark.parametrize("extra,fragment", BAD_INPUTS)
def test_bad_input_one_line(tmp_path, tiny_args, extra, fragment):
    proc = run_script("main_pretrain.py", *tiny_args, "--output_dir", str(tmp_path / "o"), *extra)
    assert_one_line_error(proc, fragment)
    assert not os.path.exists(tmp_path / "o")


def test_bad_image_folders(tmp_path, tiny_args):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run_script("main_pretrain.py", *tiny_args, "--data_path", empty), "train")
    no_images = tmp_path / "noimg"
    make_image_folder(no_images, empty_class="b")
    assert_one_line_error(run_script("main_pretrain.py", *tiny_args, "--data_path", no_images), "b")
    broken = tmp_path / "broken"
    make_image_folder(broken, per_class=4, bad=True)
    proc = run_script("main_pretrain.py", *tiny_args, "--data_path", broken, "--batch_size", "2",
                      "--output_dir", tmp_path / "o")
    assert_one_line_error(proc, "cannot read image", "broken.jpg")


def test_image_folder_with_class_subset(tmp_path, tiny_args):
    root = tmp_path / "data"
    make_image_folder(root, classes=("n01", "n02", "n03"), per_class=4)
    subset = tmp_path / "subset.txt"
    subset.write_text("n01\nn03\n")
    out = tmp_path / "o"
    proc = run_script("main_pretrain.py", *tiny_args, "--data_path", root, "--class_subset", subset,
                      "--batch_size", "4", "--output_dir", out, "--val_interval", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    state = torch.load(out / "checkpoint-0.pth", weights_only=True)
    assert state["model"]["online_head.weight"].shape[0] == 2
    subset.write_text("n01\nn09\n")
    assert_one_line_error(run_script("main_pretrain.py", *tiny_args, "--data_path", root,
                                     "--class_subset", subset), "n09")


def test_resume_from_other_model_refused_and_nothing_overwritten(tmp_path, tiny_args):
    out = str(tmp_path / "o")
    assert run_script("main_pretrain.py", *tiny_args, "--output_dir", out).returncode == 0
    ckpt = os.path.join(out, "checkpoint-0.pth")
    before = digest(ckpt)
    other = [a if a != "mae_vit_tiny_patch16" else "mae_vit_small_patch16" for a in tiny_args]
    assert_one_line_error(run_script("main_pretrain.py", *other, "--output_dir", out), "mae_vit_tiny_patch16")
    assert_one_line_error(run_script("main_pretrain.py", *other, "--resume", ckpt,
                                     "--output_dir", str(tmp_path / "p")), "mae_vit_small_patch16")
    # a different patch size is a different model too (shapes), caught before writing
    assert_one_line_error(run_script("main_pretrain.py", *tiny_args, "--patch_size", "8", "--resume", ckpt,
                                     "--output_dir", str(tmp_path / "q")), "does not fit")
    assert digest(ckpt) == before
    assert not os.path.exists(tmp_path / "p") and not os.path.exists(tmp_path / "q")
    assert_one_line_error(run_script("main_pretrain.py", *tiny_args, "--output_dir", out,
                                     "--auto_resume", "false"), "already holds checkpoints")
    assert digest(ckpt) == before


# ---- --gpu_decode: decode + augmentation on the device -------------------------------
def make_jpeg_folder(root, classes=("a", "b"), per_class=4, size=(60, 45)):
    """Photo-like JPEGs (smooth random colour fields) in train/ and val/."""
    import numpy as np
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            os.makedirs(os.path.join(root, split, c), exist_ok=True)
            for i in range(per_class):
                small = Image.fromarray(rng.integers(0, 255, (5, 6, 3), dtype=np.uint8))
                small.resize(size, Image.BICUBIC).save(os.path.join(root, split, c, f"{i}.jpg"), quality=95)


def test_gpu_decode_loader_gives_the_pil_loaders_batches(tmp_path, tiny_args):
    make_jpeg_folder(tmp_path)
    args = get_args_parser().parse_args(tiny_args + ["--data_path", str(tmp_path), "--batch_size", "4"])
    pil = build_train_loader(args, torch.device("cpu"))
    args.gpu_decode, args.nb_classes = True, None
    dev = build_train_loader(args, torch.device("cpu"))
    assert len(dev) == len(pil) == 2 and args.nb_classes == 2
    for epoch in (0, 3):
        pil.sampler.set_epoch(epoch)
        dev.sampler.set_epoch(epoch)
        for (want, t_want, s_want), (got, t_got, s_got) in zip(pil, dev):
            assert torch.equal(t_got, t_want) and torch.equal(s_got, s_want)  # same order, labels, masks
            assert got.shape == want.shape == (4, 3, 32, 32) and got.dtype == torch.float32
            # same crop and flip per sample (EpochSeeded), so only decoder and resampling
            # rounding differ: a few levels of 255 (util/gpu_aug.py)
            diff = (got - want).abs() * 0.226 * 255
            assert diff.mean() < 1.5 and diff.max() < 40, (epoch, diff.mean(), diff.max())


def test_gpu_decode_pretraining_runs_and_resumes_exactly(tmp_path, tiny_args):
    data = tmp_path / "data"
    make_jpeg_folder(data)
    common = tiny_args + ["--data_path", data, "--batch_size", "4", "--gpu_decode", "--epochs", "2",
                          "--save_every", "1"]
    full, resumed = run_and_resume_after_epoch0(tmp_path, common)
    assert len(read_log(tmp_path / "full")) == 2
    # a run that stopped after epoch 0, relaunched: the same weights as the run in one go
    assert all(torch.equal(full["model"][k], resumed["model"][k]) for k in full["model"])
