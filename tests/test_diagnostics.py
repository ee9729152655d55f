"""Representation diagnostics, kNN, fast linear evaluation and main_analyze.py."""
import json
import math
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torchvision.transforms.functional import pil_to_tensor

import models_mae
from conftest import TINY, assert_one_line_error, free_port, run_script
from loss_func import uniformity_loss, uniformity_loss_TCR
from monitors.diagnostics import FeatureStats, dims_for_variance, effective_rank, spectrum_plot
from monitors.fast_linear import LABEL, fast_linear_eval
from monitors.knn import knn_accuracy


# ---- effective rank, dims99, chunked statistics -----------------------------------
def test_effective_rank_of_known_matrices():
    d = 16
    assert effective_rank(torch.linalg.svdvals(torch.eye(d))) == pytest.approx(d)
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    assert effective_rank(torch.linalg.svdvals(3.0 * q)) == pytest.approx(d)  # equal singular values
    for k in (1, 3, 7):
        u, _ = torch.linalg.qr(torch.randn(40, k, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(d, k, dtype=torch.float64))
        sv = torch.linalg.svdvals(u @ v.T)  # rank k, k equal singular values
        assert effective_rank(sv) == pytest.approx(k, rel=1e-6)
    # unequal spectrum: strictly between 1 and the rank
    er = effective_rank(torch.tensor([10.0, 1.0, 0.1, 0.0]))
    assert 1 < er < 3
    assert effective_rank(torch.zeros(5)) == 0.0


def test_dims99():
    assert dims_for_variance(torch.ones(10)) == 10
    assert dims_for_variance(torch.tensor([99.0, 1.0, 0.0])) == 1     # exactly 99%
    assert dims_for_variance(torch.tensor([98.0, 1.5, 0.5])) == 2
    assert dims_for_variance(torch.tensor([1.0, 100.0, 0.0, 0.0])) == 1  # order does not matter
    assert dims_for_variance(torch.tensor([50.0, 50.0]), 0.5) == 1


def _low_rank_features(n=300, d=24, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
    z = torch.randn(n, k, generator=g, dtype=torch.float64) @ basis.T
    return (z + 3 * torch.randn(d, generator=g, dtype=torch.float64)).float()  # + an offset: centring matters


def test_feature_stats_spectrum_equals_svd_of_centred_features():
    z = _low_rank_features()
    stats = FeatureStats(z.shape[1])
    stats.update(z)
    out = stats.compute()
    ref = torch.linalg.svdvals((z.double() - z.double().mean(0)))
    assert torch.allclose(out["singular_values"][:5], ref[:5], rtol=1e-5)
    assert out["singular_values"][5:].max() < 1e-3 * ref[0]
    assert out["dims99"] <= 5 and out["effective_rank"] == pytest.approx(effective_rank(ref), rel=1e-3)
    assert out["n"] == z.shape[0]


@pytest.mark.parametrize("centering", [False, True])
def test_chunked_statistics_equal_one_shot_and_the_losses(centering):
    z = torch.randn(257, 32) + 0.5 * torch.randn(32)  # not centred
    one = FeatureStats(32)
    one.update(z)
    one = one.compute(uniformity_mu=2.0, centering=centering)
    chunked = FeatureStats(32)
    for part in z.split(50):
        chunked.update(part)
    chunked = chunked.compute(uniformity_mu=2.0, centering=centering)
    for k in ("effective_rank", "uniformity", "tcr"):
        assert chunked[k] == pytest.approx(one[k], rel=1e-9)
    assert chunked["dims99"] == one["dims99"]
    assert torch.allclose(chunked["singular_values"], one["singular_values"], rtol=1e-7, atol=1e-9)
    # the same values as the training losses on the whole set as one batch
    with torch.no_grad():
        assert one["uniformity"] == pytest.approx(uniformity_loss(z).item(), rel=1e-5)
        assert one["tcr"] == pytest.approx(uniformity_loss_TCR(z, 2.0, centering).item(), rel=1e-4)


def test_collapsed_features_have_low_rank_and_high_uniformity():
    collapsed = torch.randn(200, 1) @ torch.randn(1, 64) + 0.01 * torch.randn(200, 64)
    spread = torch.randn(200, 64)
    out = []
    for z in (collapsed, spread):
        s = FeatureStats(64)
        s.update(z)
        out.append(s.compute())
    assert out[0]["effective_rank"] < 0.5 * out[1]["effective_rank"]
    assert out[0]["dims99"] < out[1]["dims99"]
    assert out[0]["uniformity"] > 5 * out[1]["uniformity"]
    assert out[0]["tcr"] > out[1]["tcr"]  # -logdet: less spread, larger value


def test_spectrum_plot_is_an_image():
    img = spectrum_plot(torch.tensor([10.0, 3.0, 1.0, 0.1, 0.0]), "test")
    assert img.size == (480, 320)
    t = pil_to_tensor(img)
    assert t.shape == (3, 320, 480) and t.dtype == torch.uint8
    assert (t < 128).any()  # something was drawn


# ---- kNN -------------------------------------------------------------------------
def _clusters(n, classes, d, noise, seed):
    centers = F.normalize(torch.randn(classes, d, generator=torch.Generator().manual_seed(99)), dim=1)
    g = torch.Generator().manual_seed(seed)  # the samples' noise
    y = torch.arange(n) % classes
    return centers[y] + noise * torch.randn(n, d, generator=g), y


def _reference_knn(bank, by, q, qy, classes, k, t):
    """All at once: the definition of DINO's weighted kNN."""
    sims = F.normalize(q, dim=1) @ F.normalize(bank, dim=1).T
    v, i = sims.topk(k, dim=1)
    votes = torch.zeros(q.shape[0], classes, dtype=torch.float64)
    votes.scatter_add_(1, by[i], (v.double() / t).exp())
    return 100 * (votes.argmax(1) == qy).double().mean().item()


def test_knn_on_separable_clusters_is_near_perfect():
    bank, by = _clusters(400, 8, 16, 0.05, 0)
    q, qy = _clusters(80, 8, 16, 0.05, 1)
    out = knn_accuracy(bank, by, q, qy, 8, k=20, temperature=0.07, batch_size=32)
    assert out["acc1"] >= 99 and out["acc5"] == 100 and out["n"] == 80


def test_knn_equals_the_reference_on_noisy_clusters():
    bank, by = _clusters(301, 10, 8, 0.9, 2)
    q, qy = _clusters(97, 10, 8, 0.9, 3)
    out = knn_accuracy(bank, by, q, qy, 10, k=20, temperature=0.07, batch_size=16)
    ref = _reference_knn(bank, by, q, qy, 10, 20, 0.07)
    assert 20 < ref < 95  # a case where neighbours disagree
    assert out["acc1"] == pytest.approx(ref)


def _dist_worker(rank, world, port, out_dir):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    bank, by = _clusters(301, 10, 8, 0.9, 2)
    q, qy = _clusters(33, 10, 8, 0.9, 3)  # shards of 17 and 16 queries: 2 steps and 1 step of 16
    knn = knn_accuracy(bank[rank::world], by[rank::world], q[rank::world], qy[rank::world], 10,
                       k=20, temperature=0.07, batch_size=16)
    z = torch.randn(90, 12, generator=torch.Generator().manual_seed(5)) + 1.0
    stats = FeatureStats(12)
    stats.update(z[rank::world])
    diag = stats.all_reduce().compute(uniformity_mu=1.0, centering=True)
    diag["singular_values"] = diag["singular_values"].tolist()
    if rank == 0:
        with open(os.path.join(out_dir, "dist.json"), "w") as f:
            json.dump({"knn": knn, "diag": diag}, f)
    dist.destroy_process_group()


def test_distributed_knn_and_statistics_equal_one_process(tmp_path):
    mp.spawn(_dist_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    got = json.load(open(tmp_path / "dist.json"))
    bank, by = _clusters(301, 10, 8, 0.9, 2)
    q, qy = _clusters(33, 10, 8, 0.9, 3)
    one = knn_accuracy(bank, by, q, qy, 10, k=20, temperature=0.07, batch_size=16)
    assert got["knn"] == one
    z = torch.randn(90, 12, generator=torch.Generator().manual_seed(5)) + 1.0
    stats = FeatureStats(12)
    stats.update(z)
    ref = stats.compute(uniformity_mu=1.0, centering=True)
    for k in ("effective_rank", "uniformity", "tcr"):
        assert got["diag"][k] == pytest.approx(ref[k], rel=1e-10)
    assert got["diag"]["n"] == 90 and got["diag"]["dims99"] == ref["dims99"]


# ---- fast linear ------------------------------------------------------------------
def test_fast_linear_recovers_a_planted_rule():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(20, 5, generator=g)
    x = torch.randn(3000, 20, generator=g) * torch.linspace(0.1, 10, 20) + 4.0  # unequal scales
    y = ((x - 4.0) / torch.linspace(0.1, 10, 20) @ w).argmax(1)
    out = fast_linear_eval(x[:2500], y[:2500], x[2500:], y[2500:], 5, steps=100)
    assert out["label"] == LABEL
    assert out["logreg"]["acc1"] > 93, out
    assert out["ridge"]["acc1"] > 75, out  # least squares on one-hot targets: a weaker rule
    assert set(out["logreg"]["holdout_acc1"]) == {1e-4, 1e-3, 1e-2}
    # labels unrelated to the features: chance level
    noise = fast_linear_eval(x[:2500], torch.randint(0, 5, (2500,), generator=g), x[2500:],
                             y[2500:], 5, steps=50, methods=("logreg",))
    assert noise["acc1"] < 40


# ---- main_pretrain hook and main_analyze.py ------------------------------------------
@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pre")
    proc = run_script("main_pretrain.py", *TINY, "--val_interval", "1", "--diag_images", "16",
                      "--knn_monitor", "--reg", "tcr", "--lamb", "0.01", "--output_dir", out)
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_pretraining_logs_diagnostics(pretrained):
    out, proc = pretrained
    stats = [json.loads(line) for line in open(out / "log.txt")][-1]
    assert 1 <= stats["diag_effective_rank"] <= 15 + 1e-6  # 16 images: centred rank <= 15
    assert 1 <= stats["diag_dims99"] <= 15
    assert 0 < stats["diag_uniformity"] <= 1 and math.isfinite(stats["diag_tcr"])
    assert 0 <= stats["val_knn_acc1"] <= stats["val_knn_acc5"] <= 100
    assert "diagnostics: effective rank" in proc.stdout
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out), size_guidance={"images": 0}).Reload()
    for tag in ("diag/effective_rank", "diag/dims99", "diag/uniformity", "diag/tcr", "val/knn_acc1"):
        assert tag in events.Tags()["scalars"], events.Tags()
    assert events.Scalars("diag/effective_rank")[-1].value == pytest.approx(stats["diag_effective_rank"])
    assert "diag/spectrum" in events.Tags()["images"]


def test_analyze_our_checkpoint_on_one_and_two_processes(pretrained, tmp_path):
    out, _ = pretrained
    common = ["--checkpoint", out / "checkpoint-0.pth", "--synthetic_size", "64", "--num_workers", "0",
              "--batch_size", "8"]
    one = run_script("main_analyze.py", *common, "--output_dir", tmp_path, "--out_json", tmp_path / "one.json")
    assert one.returncode == 0, one.stderr
    r = json.load(open(tmp_path / "one.json"))
    assert r["model"] == "mae_vit_tiny_patch16" and r["epoch"] == 0
    d = r["diagnostics"]
    assert d["n"] == 16 and 1 <= d["effective_rank"] <= 15 + 1e-6 and len(d["singular_values"]) == 192
    assert 0 <= r["knn"]["acc1"] <= 100 and r["linear"]["label"] == LABEL
    assert r["linear"]["n_train"] == 64 and r["recon_loss"] > 0
    assert (tmp_path / "spectrum.png").is_file() and (tmp_path / "reconstruction-analysis.png").is_file()
    assert "fast linear (frozen features, not the 90-epoch LARS protocol)" in one.stdout

    two = run_script("main_analyze.py", *common, "--output_dir", tmp_path / "two", "--out_json",
                     tmp_path / "two.json", torchrun=2)
    assert two.returncode == 0, two.stderr
    b = json.load(open(tmp_path / "two.json"))
    assert r["knn"] == b["knn"] and r["diagnostics"]["dims99"] == b["diagnostics"]["dims99"]
    for k in ("effective_rank", "uniformity", "tcr"):
        assert r["diagnostics"][k] == pytest.approx(b["diagnostics"][k], rel=1e-4)
    assert r["recon_loss"] == pytest.approx(b["recon_loss"], rel=1e-4)
    for m in ("logreg", "ridge"):  # features gathered back into dataset order: the same fit
        # (up to float rounding of the features: at most one of the 16 val images may flip)
        assert b["linear"][m]["acc1"] == pytest.approx(r["linear"][m]["acc1"], abs=100 / 16 + 1e-6)


def test_analyze_every_rank_fits_a_bounded_train_subset(pretrained, tmp_path):
    """ImageNet scale: the fits use --train_images (default 50,000, stated in the log) of
    the train set, and under torchrun every rank fits the gathered features itself (on
    its device), so no rank waits in a collective while rank 0 alone fits."""
    out, _ = pretrained
    import main_analyze
    assert main_analyze.get_args_parser().parse_args(["--checkpoint", "c"]).train_images == 50000
    proc = run_script("tests/analyze_fit_worker.py", tmp_path, "--checkpoint", out / "checkpoint-0.pth",
                      "--synthetic_size", "64", "--num_workers", "0", "--batch_size", "8", "--train_images", "40",
                      "--knn", "false", "--output_dir", tmp_path, "--out_json", tmp_path / "r.json", torchrun=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "kNN bank and linear fit: 40 of 64 train images" in proc.stdout
    fits = [json.load(open(tmp_path / f"fit-rank{r}.json")) for r in (0, 1)]
    assert fits[0] == fits[1] == {"n_train": 40, "device": "cpu"}, fits
    assert json.load(open(tmp_path / "r.json"))["linear"]["n_train"] == 40


def test_analyze_official_encoder_only_checkpoint(tmp_path):
    model = models_mae.mae_vit_tiny_patch16(img_size=32, patch_size=4)
    encoder = {k: v for k, v in model.state_dict().items()
               if not k.startswith(("decoder", "mask_token", "online_head"))}
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": encoder}, path)
    # analysed at 16 px: the 8x8 position embedding is resized to 4x4
    proc = run_script("main_analyze.py", "--checkpoint", path, "--model", "mae_vit_tiny_patch16",
                      "--input_size", "16", "--patch_size", "4", "--synthetic_size", "32", "--num_workers", "0",
                      "--batch_size", "16", "--linear", "false", "--out_json", tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr
    assert "decoder keys" in proc.stdout and "no decoder in the checkpoint" in proc.stdout
    r = json.load(open(tmp_path / "r.json"))
    assert r["recon_loss"] is None and "linear" not in r and r["diagnostics"]["n"] == 8
    assert (tmp_path / "spectrum.png").is_file() and not (tmp_path / "reconstruction-analysis.png").exists()


def test_analyze_bad_input_is_one_line(tmp_path, capsys):
    assert_one_line_error(run_script("main_analyze.py", "--checkpoint", tmp_path / "nope.pth"), "does not exist")
    import main_analyze  # the other cases in-process: no interpreter start-up per case
    model = models_mae.mae_vit_tiny_patch16(img_size=32, patch_size=4)
    path = tmp_path / "enc.pth"
    torch.save({"model": model.state_dict()}, path)
    torch.save({"weights": 1}, tmp_path / "other.pth")
    for argv, fragment in [(["--checkpoint", path], "pass --model"),
                           (["--checkpoint", tmp_path / "other.pth"], "no 'model' entry"),
                           (["--checkpoint", path, "--model", "mae_vit_small_patch16", "--input_size", "32",
                             "--patch_size", "4", "--synthetic_size", "8"], "does not fit"),
                           (["--checkpoint", path, "--model", "mae_vit_tiny_patch16", "--knn_k", "0"], "--knn_k")]:
        args = main_analyze.get_args_parser().parse_args([str(a) for a in argv])
        with pytest.raises(SystemExit) as e:
            main_analyze.main(args)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err


def test_fit_logreg_neither_draws_from_nor_reseeds_the_global_generator():
    from monitors.fast_linear import fit_logreg
    torch.manual_seed(5)
    x, y = torch.randn(40, 6), torch.arange(40) % 3
    state = torch.get_rng_state()
    first = fit_logreg(x, y, 3, 1e-3)(x)
    assert torch.equal(torch.get_rng_state(), state)  # before: reseeded to 0
    assert torch.equal(fit_logreg(x, y, 3, 1e-3)(x), first)  # zero start: repeatable
