"""Real-image study: does MAE learn here, and do U-MAE / M-MAE help? (Tiny-ImageNet-100)

Every run pretrains the same ViT (64 px, patch 8, 192-d encoder of 6 blocks, 128-d
decoder of 2 blocks, mask 0.75, norm_pix_loss, batch 128, blr 1.5e-4, wd 0.05,
4 epochs with 1 warmup) on all 50,000 train images with main_pretrain.py, then
main_analyze.py measures the final checkpoint on the 5,000 unmasked val images:
effective rank, dims99, uniformity, TCR, kNN (k 20, T 0.07) and fast linear
top-1 on cls and on avg-pool features, and the val reconstruction loss. `init`
measures the untrained model of each seed.

    .venv/bin/python benchmarks/study.py                  # run (or resume) the whole study, then report
    .venv/bin/python benchmarks/study.py --phase report   # table in RESULTS.md, study.png, recon grid

Resumable: a run whose result is in results.json is skipped; an unfinished one
continues from its newest checkpoint in --work_dir (main_pretrain's auto-resume,
checkpoints every 100 steps). Two invocations at once share the work (each run is
claimed by one). Run it from a clean checkout at a fixed commit (a `git worktree`),
which is recorded with every result; --out_dir says where results.json goes.

Third seeds: MAE gets seeds 0-2; the regulariser setting with the best mean fast-linear
cls top-1 over its first two seeds gets a third. That rule is fixed here, before any
result is seen.
"""
import argparse
import fcntl
import json
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TARS = os.path.join(REPO, "..", "shared", "data", "tiny-imagenet-100")

SHAPE = ["--model", "mae_vit_tiny_patch16", "--input_size", "64", "--patch_size", "8", "--depth", "6",
         "--decoder_embed_dim", "128", "--decoder_depth", "2", "--mask_ratio", "0.75", "--norm_pix_loss"]
RECIPE = ["--batch_size", "128", "--blr", "1.5e-4", "--weight_decay", "0.05", "--epochs", "4",
          "--warmup_epochs", "1"]
EPOCHS = 4

# setting -> (method, regulariser flags); None = the untrained model
SETTINGS = {
    "init": ("init", None),
    "mae": ("MAE", []),
    "umae_l0.01": ("U-MAE", ["--reg", "uniformity", "--lamb", "0.01"]),
    "mmae_mu1_l0.01": ("M-MAE", ["--reg", "tcr", "--lamb", "0.01", "--uniformity_mu", "1"]),
    "mmae_mu3_l0.01": ("M-MAE", ["--reg", "tcr", "--lamb", "0.01", "--uniformity_mu", "3"]),
    "umae_l0.1": ("U-MAE", ["--reg", "uniformity", "--lamb", "0.1"]),
    "mmae_mu1_l0.1": ("M-MAE", ["--reg", "tcr", "--lamb", "0.1", "--uniformity_mu", "1"]),
}
REGULARISED = [s for s in SETTINGS if s not in ("init", "mae")]


def planned_runs(results):
    """(setting, seed) in the order they run: seed 0 of everything, seed 1, then third seeds."""
    plan = [(s, seed) for seed in (0, 1) for s in SETTINGS] + [("init", 2), ("mae", 2)]
    best = best_regulariser(results)
    if best:
        plan.append((best, 2))
    return plan


def best_regulariser(results):
    """The regularised setting with the highest mean fast-linear cls top-1 over seeds 0 and 1,
    once all of them have both seeds (None before)."""
    means = {}
    for s in REGULARISED:
        accs = [r["linear_cls"] for r in results.values() if r["setting"] == s and r["seed"] in (0, 1)]
        if len(accs) < 2:
            return None
        means[s] = statistics.mean(accs)
    return max(means, key=means.get)


def get_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase", default="all", choices=["all", "run", "report"])
    p.add_argument("--work_dir", default=os.path.join(tempfile.gettempdir(), "mae_study"),
                   help="unpacked data, checkpoints and logs (outside the repository)")
    p.add_argument("--out_dir", default=os.path.join(REPO, "benchmarks", "study"),
                   help="results.json, reconstruction pictures, study.png")
    p.add_argument("--results_md", default=os.path.join(REPO, "benchmarks", "RESULTS.md"),
                   help="the file whose study table --phase report rewrites")
    p.add_argument("--tars", default=DEFAULT_TARS, help="folder with train.tar.gz and val.tar.gz")
    p.add_argument("--data_path", default=None, help="unpacked ImageFolder root (skips unpacking)")
    p.add_argument("--threads", default=1, type=int, help="torch threads per run")
    p.add_argument("--max_runs", default=0, type=int, help="stop after this many runs (0 = all)")
    p.add_argument("--allow_dirty", action="store_true", help="run from a tree with uncommitted changes")
    return p.parse_args()


# ---- bookkeeping ---------------------------------------------------------------------------
def commit_of(repo):
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                           capture_output=True, text=True).stdout.strip()
    return head, bool(dirty)


def load_results(out_dir):
    path = os.path.join(out_dir, "results.json")
    if not os.path.isfile(path):
        return {}
    return {r["name"]: r for r in json.load(open(path))}


def save_result(out_dir, result):
    """Add one run to results.json (read-modify-write under a lock, atomic rename)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, ".results.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = load_results(out_dir)
        results[result["name"]] = result
        order = {name: i for i, name in enumerate(f"{s}_s{seed}" for seed in (0, 1, 2) for s in SETTINGS)}
        rows = sorted(results.values(), key=lambda r: order.get(r["name"], len(order)))
        tmp = os.path.join(out_dir, "results.json.tmp")
        with open(tmp, "w") as f:
            json.dump(rows, f, indent=1)
            f.write("\n")
        os.replace(tmp, os.path.join(out_dir, "results.json"))


def claim(run_dir):
    """True if this process may work on the run (no other live process holds it)."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, ".claim")
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            os.kill(int(open(path).read() or 0), 0)
            return False  # its owner is alive
        except (ProcessLookupError, ValueError):
            os.remove(path)  # left by a dead process
            return claim(run_dir)
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return True


def release(run_dir):
    path = os.path.join(run_dir, ".claim")
    if os.path.isfile(path) and open(path).read() == str(os.getpid()):
        os.remove(path)


def unpack(args):
    if args.data_path:
        return args.data_path
    root = os.path.join(args.work_dir, "data")
    if not (os.path.isdir(os.path.join(root, "val")) and os.path.isdir(os.path.join(root, "train"))):
        tmp = root + f".tmp{os.getpid()}"
        os.makedirs(tmp, exist_ok=True)
        for split in ("train", "val"):
            with tarfile.open(os.path.join(args.tars, f"{split}.tar.gz")) as tar:
                tar.extractall(tmp, filter="data")
        try:
            os.rename(tmp, root)
        except OSError:  # another invocation unpacked it first
            pass
    return root


def run(cmd, log_path, threads):
    """Run a command, its output appended to a log file; returns the wall time in seconds."""
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.time()
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads))
    with open(log_path, "a") as log:
        if subprocess.call(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env) != 0:
            sys.exit(f"command failed; see {log_path}")
    return time.time() - t0


# ---- one run -------------------------------------------------------------------------------
def pretrain(args, run_dir, setting, seed, data):
    """Train (or resume) to the final checkpoint; returns (checkpoint, command, seconds)."""
    final = os.path.join(run_dir, f"checkpoint-{EPOCHS - 1}.pth")
    timing = os.path.join(run_dir, "pretrain_s.json")
    reg = SETTINGS[setting][1]
    if reg is None:
        if not os.path.isfile(final):
            save_untrained(final, seed)
        return final, "(untrained: main_pretrain's initialisation for this seed)", 0.0
    cmd = [sys.executable, "main_pretrain.py", *SHAPE, *RECIPE, "--seed", str(seed), "--data_path", data,
           "--device", "cpu", "--num_workers", "1", "--val_interval", str(EPOCHS), "--vis_every", str(EPOCHS),
           "--diag_images", "0", "--save_every", str(EPOCHS), "--save_every_steps", "100", "--keep_last", "1",
           "--print_freq", "50", "--output_dir", run_dir, *reg]
    spent = json.load(open(timing))["s"] if os.path.isfile(timing) else 0.0
    if not os.path.isfile(final):
        spent += run(cmd, os.path.join(run_dir, "pretrain.log"), args.threads)
        with open(timing, "w") as f:
            json.dump({"s": spent}, f)
    return final, " ".join(["python"] + cmd[1:]), spent


def epoch_seconds(log_path):
    """{epoch: seconds} from main_pretrain's "Epoch: [k] total time: H:MM:SS" lines (the last
    line per epoch wins: an epoch resumed from a step checkpoint counts its resumed part only).
    Unlike the invocation wall time, this survives a study stopped and resumed across sessions."""
    times = {}
    if os.path.isfile(log_path):
        with open(log_path) as f:
            text = f.read()
        for m in re.finditer(r"Epoch: \[(\d+)\] total time: (\d+):(\d+):(\d+)", text):
            h, mi, sec = (int(g) for g in m.groups()[1:])
            times[int(m.group(1))] = 3600 * h + 60 * mi + sec
    return times


def median_epoch_s(log_path):
    times = epoch_seconds(log_path)
    return statistics.median(times.values()) if times else None


def save_untrained(path, seed):
    """The model as main_pretrain.py initialises it for `seed`, never trained."""
    sys.path.insert(0, REPO)
    import torch
    from main_pretrain import build_model, get_args_parser
    margs = get_args_parser().parse_args([*SHAPE, "--nb_classes", "100"])
    torch.manual_seed(seed)
    model = build_model(margs)
    saved = {k: getattr(margs, k) for k in ("model", "input_size", "patch_size", "depth", "decoder_embed_dim",
                                            "decoder_depth", "norm_pix_loss", "global_pool", "mask_ratio")}
    tmp = path + ".tmp"
    torch.save({"model": model.state_dict(), "args": saved, "epoch": -1}, tmp)
    os.replace(tmp, path)


def analyze(args, run_dir, ckpt, data):
    out = os.path.join(run_dir, "analysis.json")
    cmd = [sys.executable, "main_analyze.py", "--checkpoint", ckpt, "--data_path", data, "--device", "cpu",
           "--num_workers", "1", "--batch_size", "256", "--pools", "cls,avg", "--diag_images", "0",
           "--train_images", "0", "--output_dir", run_dir, "--out_json", out,
           # TCR measured alike for every run (mu 1, no centering), whatever the run trained with
           "--uniformity_mu", "1", "--centering", "false"]
    if not os.path.isfile(out):
        wall = run(cmd, os.path.join(run_dir, "analyze.log"), args.threads)
        with open(os.path.join(run_dir, "analyze_s.json"), "w") as f:
            json.dump({"s": wall}, f)
    return json.load(open(out)), json.load(open(os.path.join(run_dir, "analyze_s.json")))["s"]


def run_one(args, setting, seed, data, commit):
    name = f"{setting}_s{seed}"
    run_dir = os.path.join(args.work_dir, name)
    if not claim(run_dir):
        print(f"[{name}] taken by another invocation")
        return False
    try:
        print(f"[{name}] start", flush=True)
        ckpt, cmd, pretrain_s = pretrain(args, run_dir, setting, seed, data)
        a, analyze_s = analyze(args, run_dir, ckpt, data)
        log = os.path.join(run_dir, "log.txt")
        last = [json.loads(line) for line in open(log)][-1] if os.path.isfile(log) else {}
        method, reg = SETTINGS[setting]
        result = {"name": name, "setting": setting, "method": method, "seed": seed,
                  "flags": reg if reg is not None else "(untrained)", "commit": commit, "epochs": EPOCHS,
                  "shape": " ".join(SHAPE), "recipe": " ".join(RECIPE) if reg is not None else None,
                  "command": cmd}
        for pool in ("cls", "avg"):
            p = a["pools"][pool]
            d = p["diagnostics"]
            result.update({f"erank_{pool}": d["effective_rank"], f"dims99_{pool}": d["dims99"],
                           f"uniformity_{pool}": d["uniformity"], f"tcr_{pool}": d["tcr"],
                           f"knn_{pool}": p["knn"]["acc1"], f"linear_{pool}": p["linear"]["logreg"]["acc1"],
                           f"ridge_{pool}": p["linear"]["ridge"]["acc1"]})
        result.update({"recon_loss": a["recon_loss"], "online_acc1": last.get("val_online_acc1"),
                       "pretrain_s": round(pretrain_s, 1), "analyze_s": round(analyze_s, 1),
                       "epoch_s": median_epoch_s(os.path.join(run_dir, "pretrain.log")),
                       "singular_values_cls": [round(v, 6) for v in a["pools"]["cls"]["diagnostics"]["singular_values"]]})
        recon = os.path.join(run_dir, "reconstruction-analysis.png")
        if os.path.isfile(recon):
            os.makedirs(os.path.join(args.out_dir, "recon"), exist_ok=True)
            with open(recon, "rb") as src, open(os.path.join(args.out_dir, "recon", f"{name}.png"), "wb") as dst:
                dst.write(src.read())
        save_result(args.out_dir, result)
        print(f"[{name}] done: linear cls {result['linear_cls']:.2f}, kNN cls {result['knn_cls']:.2f}, "
              f"erank cls {result['erank_cls']:.1f}", flush=True)
        return True
    finally:
        release(run_dir)


# ---- report --------------------------------------------------------------------------------
METRICS = [("linear_cls", "linear cls", 2), ("linear_avg", "linear avg", 2), ("knn_cls", "kNN cls", 2),
           ("knn_avg", "kNN avg", 2), ("erank_cls", "erank cls", 1), ("erank_avg", "erank avg", 1),
           ("dims99_cls", "dims99 cls", 1), ("uniformity_cls", "unif. cls", 4), ("tcr_cls", "TCR cls", 2),
           ("recon_loss", "val recon", 4), ("online_acc1", "online", 2), ("epoch_s", "s/epoch", 0)]


def summarise(rows, key):
    vals = [r[key] for r in rows if r.get(key) is not None]
    if not vals:
        return None
    return {"mean": statistics.mean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals), "max": max(vals), "n": len(vals)}


def report(args):
    results = load_results(args.out_dir)
    if not results:
        sys.exit(f"no results in {args.out_dir}/results.json yet")
    by_setting = {s: [r for r in results.values() if r["setting"] == s] for s in SETTINGS}
    by_setting = {s: rows for s, rows in by_setting.items() if rows}
    commits = sorted({r["commit"] for r in results.values()})
    lines = [f"Runs: {len(results)} (commit{'s' if len(commits) > 1 else ''} "
             f"{', '.join(c[:10] for c in commits)}). Each cell: mean ± sd over seeds (n seeds); "
             "accuracies in %, on the 5,000 unmasked val images; fast linear = L-BFGS logistic "
             "regression on frozen standardised features of all 50,000 train images.", "",
             "| setting | flags | seeds | " + " | ".join(label for _, label, _ in METRICS) + " |",
             "|" + " --- |" * (3 + len(METRICS))]
    for s, rows in by_setting.items():
        flags = rows[0]["flags"] if isinstance(rows[0]["flags"], str) else (" ".join(rows[0]["flags"]) or "-")
        cells = []
        for key, _, digits in METRICS:
            m = summarise(rows, key)
            cells.append("-" if m is None else
                         f"{m['mean']:.{digits}f} ± {m['sd']:.{digits}f}" if m["n"] > 1 else f"{m['mean']:.{digits}f}")
        lines.append(f"| {s} | {flags} | {len(rows)} | " + " | ".join(cells) + " |")
    lines += ["", "Differences to MAE whose seed ranges do not overlap (min..max over seeds):", ""]
    if "mae" in by_setting:
        for s, rows in by_setting.items():
            if s == "mae":
                continue
            notes = []
            if min(len(rows), len(by_setting["mae"])) < 2:
                lines.append(f"- {s}: fewer than 2 seeds on one side, no spread to compare with yet")
                continue
            for key, label, digits in METRICS[:9]:
                a, b = summarise(rows, key), summarise(by_setting["mae"], key)
                if a is None or b is None:
                    continue
                sep = a["min"] > b["max"] or a["max"] < b["min"]
                if sep:
                    notes.append(f"{label} {a['mean'] - b['mean']:+.{max(digits, 1)}f}")
            lines.append(f"- {s}: " + (", ".join(notes) if notes else "none (every difference within the spread)"))
    table = "\n".join(lines)
    write_between_markers(args.results_md, table)
    plot(args, by_setting)
    recon_grid(args, results)
    print(table)


def write_between_markers(path, text, start="<!-- study-table:start -->", end="<!-- study-table:end -->"):
    doc = open(path).read() if os.path.isfile(path) else ""
    block = f"{start}\n{text}\n{end}"
    if start in doc and end in doc:
        doc = doc[:doc.index(start)] + block + doc[doc.index(end) + len(end):]
    else:
        doc = doc.rstrip("\n") + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(doc)


def plot(args, by_setting):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (s, rows) in enumerate(by_setting.items()):
        for j, r in enumerate(rows):
            # the last one is ~0 for every model: the features leave the encoder's LayerNorm,
            # whose normalised output sums to zero, so they span at most d - 1 dimensions
            sv = [v for v in r["singular_values_cls"] if v > 1e-4 * r["singular_values_cls"][0]]
            ax1.semilogy(sv, color=colors[i % len(colors)], alpha=0.8, label=s if j == 0 else None)
    ax1.set(title="singular values of cls features (5,000 val images, centred)", xlabel="index",
            ylabel="singular value")
    ax1.legend(fontsize=8)
    names = list(by_setting)
    for k, (key, label) in enumerate([("linear_cls", "fast linear cls"), ("knn_cls", "kNN cls")]):
        for i, s in enumerate(names):
            vals = [r[key] for r in by_setting[s]]
            x = i + (k - 0.5) * 0.3
            ax2.bar(x, statistics.mean(vals), width=0.3, color=colors[k], alpha=0.6,
                    label=label if i == 0 else None)
            ax2.scatter([x] * len(vals), vals, color="black", s=10, zorder=3)
    ax2.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax2.set(title="top-1 on val (bars: mean, dots: seeds)", ylabel="top-1 (%)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(args.out_dir, "study.png")
    fig.savefig(path, dpi=110)
    print(f"written {path}")


def recon_grid(args, results):
    """MAE's and the best regulariser's reconstructions of the same val images and masks, side by side."""
    from PIL import Image, ImageDraw
    best = best_regulariser(results)
    picks = [("mae_s0", "MAE seed 0")] + ([(f"{best}_s0", f"{best} seed 0")] if best else [])
    tiles = []
    for name, label in picks:
        path = os.path.join(args.out_dir, "recon", f"{name}.png")
        if os.path.isfile(path):
            tile = Image.open(path).convert("RGB")
            tiles.append((tile.resize((tile.width * 3, tile.height * 3), Image.NEAREST), label))  # 64 px images
    if not tiles:
        return
    w, h = sum(t.width for t, _ in tiles) + 20 * (len(tiles) - 1), max(t.height for t, _ in tiles) + 20
    canvas = Image.new("RGB", (w, h), "white")
    draw, x = ImageDraw.Draw(canvas), 0
    for t, label in tiles:
        canvas.paste(t, (x, 20))
        draw.text((x + 2, 4), label + ": original | masked | reconstruction | + visible", fill="black")
        x += t.width + 20
    path = os.path.join(args.out_dir, "reconstructions.png")
    canvas.save(path)
    print(f"written {path}")


def main():
    args = get_args()
    if args.phase in ("all", "run"):
        commit, dirty = commit_of(REPO)
        if dirty and not args.allow_dirty:
            sys.exit(f"error: {REPO} has uncommitted changes; run the study from a clean checkout "
                     "(git worktree add <dir> <commit>) or pass --allow_dirty")
        os.makedirs(args.work_dir, exist_ok=True)
        data = unpack(args)
        done = 0
        while True:
            results = load_results(args.out_dir)
            todo = [(s, seed) for s, seed in planned_runs(results) if f"{s}_s{seed}" not in results]
            started = False
            for setting, seed in todo:
                if run_one(args, setting, seed, data, commit + ("-dirty" if dirty else "")):
                    done, started = done + 1, True
                    break
            if not started or (args.max_runs and done >= args.max_runs):
                break
        print(f"{done} run(s) finished by this invocation; "
              f"{len(todo) - (1 if started else 0)} planned run(s) not finished or taken by another")
    if args.phase in ("all", "report"):
        report(args)


if __name__ == "__main__":
    main()
