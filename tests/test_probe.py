"""--probe_data: kNN and the linear classifier on a small labelled set beside the pretraining data."""
import json

import numpy as np
import torch
from PIL import Image

from conftest import TINY, run_script
from monitors.probe import fit_linear, gather_in_order, topk_accuracy


def test_linear_fit_is_repeatable_separates_and_leaves_the_global_rng():
    """The same features and seed give the same classifier (epochs compare), another seed
    another one; two separable clusters are classified right; the global RNG is not used."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, 8, generator=g) + 3 * torch.arange(3).repeat(20)[:, None]
    y = torch.arange(3).repeat(20)
    state = torch.get_rng_state()
    a, b, c = fit_linear(x, y, 3, seed=0), fit_linear(x, y, 3, seed=0), fit_linear(x, y, 3, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a(x), b(x)) and not torch.equal(a(x), c(x))
    acc = topk_accuracy(a(x), y)
    assert acc == {"acc1": 100.0, "acc5": 100.0, "n": 60}


def test_gather_in_order_on_one_rank_is_the_shard():
    x = torch.arange(7.0)[:, None]
    assert torch.equal(gather_in_order(x, 7), x)


def write_probe(root, n_train, n_val):
    """A 2-class ImageFolder root whose classes are hard to tell apart (noise, a faint tint):
    accuracies away from 0 and 100, so a changed fit or sample shows."""
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            c = i % 2
            pixels = (torch.rand(36, 40, 3, generator=g) * 200 + 3 * c).byte().numpy()
            (root / split / f"c{c}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(root / split / f"c{c}" / f"{i}.png")


def unlabeled_tree(root, n=20):
    root.mkdir()
    for i in range(n):
        Image.new("RGB", (40, 36), (i * 9, 50, 100 + i)).save(root / f"{i}.png")


def args_for(tmp_path, *extra):
    return [*TINY, "--data_path", tmp_path / "data", "--labels", "none", "--holdout", "0.2",
            "--val_interval", "1", "--diag_images", "4", *extra]


def test_probe_data_changes_neither_the_weights_nor_the_rng_stream(tmp_path):
    """2 epochs with a probe every epoch end where 2 epochs without it do: the same model,
    optimizer state and saved RNG states of every rank, bit for bit."""
    unlabeled_tree(tmp_path / "data")
    write_probe(tmp_path / "probe", 10, 5)
    ckpts = []
    for name, extra in (("plain", []), ("probed", ["--probe_data", tmp_path / "probe"])):
        proc = run_script("main_pretrain.py", *args_for(tmp_path, "--epochs", "2", *extra),
                          "--output_dir", tmp_path / name)
        assert proc.returncode == 0, proc.stderr[-2000:]
        ckpts.append(torch.load(tmp_path / name / "checkpoint-1.pth", weights_only=False))
    stats = [json.loads(line) for line in (tmp_path / "probed" / "log.txt").read_text().splitlines()]
    assert [0 <= s["probe_linear_acc1"] <= 100 for s in stats] == [True, True]
    plain, probed = ckpts
    for key in ("model", "optimizer", "rng"):
        assert identical(probed[key], plain[key]), key


def identical(a, b):
    """Bitwise equality of nested checkpoint values (tensors, numpy arrays, RNG tuples)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(identical(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    return a == b


def probe_numbers(out):
    stats = json.loads((out / "log.txt").read_text().splitlines()[-1])
    return {k: v for k, v in stats.items() if k.startswith("probe_")}


def test_probe_numbers_on_two_ranks_equal_one_rank(tmp_path):
    """A probe of 13 train and 7 val images (primes: no batch or rank count divides them):
    2 gloo ranks of batch 4 log the kNN and linear numbers of 1 rank of batch 8 (the same
    effective batch, so the same training), both ranks finish, and every val image is
    counted once (a padding sampler would score 8). Exact equality: the pretrained weights
    agree to float rounding only (DDP's mean of two gradients), but no probe image lies that
    close to a decision boundary, so the counts are the same."""
    unlabeled_tree(tmp_path / "data")
    write_probe(tmp_path / "probe", 13, 7)
    numbers = {}
    for ranks, batch in ((1, 8), (2, 4)):
        out = tmp_path / f"w{ranks}"
        proc = run_script("main_pretrain.py", *args_for(tmp_path, "--probe_data", tmp_path / "probe"),
                          "--batch_size", batch, "--output_dir", out, torchrun=ranks if ranks > 1 else 0)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "probe on 7 --probe_data val images" in proc.stdout
        assert "fit on 13 train images" in proc.stdout
        numbers[ranks] = probe_numbers(out)
    assert set(numbers[1]) == {"probe_knn_acc1", "probe_knn_acc5", "probe_linear_acc1", "probe_linear_acc5"}
    assert numbers[2] == numbers[1]


def test_monitors_on_labelled_data_change_neither_the_weights_nor_the_rng_stream(tmp_path):
    """Labelled data, 2 epochs: with every monitor at every epoch (online probe on val, kNN,
    diagnostics, --probe_data) the run ends where it ends with none (--val_interval 0):
    the same model, optimizer state and saved RNG states, bit for bit. The eval loaders
    must not draw their workers' base seed from the global generator."""
    write_probe(tmp_path / "data", 23, 5)
    ckpts = []
    for name, extra in (("quiet", ["--val_interval", "0", "--diag_images", "0"]),
                        ("monitored", ["--val_interval", "1", "--knn_monitor", "--diag_images", "4",
                                       "--probe_data", tmp_path / "data"])):
        proc = run_script("main_pretrain.py", *TINY, "--data_path", tmp_path / "data", "--epochs", "2",
                          "--batch_size", "8", "--num_workers", "1", *extra, "--output_dir", tmp_path / name)
        assert proc.returncode == 0, proc.stderr[-2000:]
        ckpts.append(torch.load(tmp_path / name / "checkpoint-1.pth", weights_only=False))
    log = (tmp_path / "monitored" / "log.txt").read_text()
    assert "val_online_acc1" in log and "knn" in log and "probe_linear_acc1" in log
    quiet, monitored = ckpts
    for key in ("model", "optimizer", "rng"):
        assert identical(monitored[key], quiet[key]), key
