"""Collapse study on real images: MAE vs U-MAE vs M-MAE at a small, equal budget.

Every run pretrains the same model with the same data, schedule and seed
(main_pretrain.py subprocesses), then main_analyze.py measures the final
checkpoint: fast linear probe, kNN, effective rank, reconstruction loss. The run
`init` measures the untrained model, the baseline every run starts from.
Results and their reading: benchmarks/RESULTS.md, "Collapse study".

    .venv/bin/python benchmarks/collapse_study.py                    # everything
    .venv/bin/python benchmarks/collapse_study.py --phase pretrain   # then --phase analyze, --phase report

Data: ../shared/data/tiny-imagenet-100 (two tar.gz), unpacked into --work_dir
(outside the repository), or an already unpacked ImageFolder root via --data_path.
Finished runs are skipped, so an interrupted study continues where it stopped.
"""
import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TARS = os.path.join(REPO, "..", "shared", "data", "tiny-imagenet-100")

# name -> regulariser flags; the first three are the main comparison (the
# published lamb 1e-2), the others a small sweep of lamb, mu and centering.
RUNS = {
    "init": None,  # the untrained model (seed 0): where every run starts from
    "mae": [],
    "umae_l0.01": ["--reg", "uniformity", "--lamb", "0.01"],
    "mmae_l0.01": ["--reg", "tcr", "--lamb", "0.01", "--uniformity_mu", "1"],
    "umae_l0.1": ["--reg", "uniformity", "--lamb", "0.1"],
    "mmae_l0.1": ["--reg", "tcr", "--lamb", "0.1", "--uniformity_mu", "1"],
    "mmae_l0.1_mu3": ["--reg", "tcr", "--lamb", "0.1", "--uniformity_mu", "3"],
    "mmae_l0.1_center": ["--reg", "tcr", "--lamb", "0.1", "--uniformity_mu", "1", "--centering"],
    # MAE again, identical flags: how far two runs of one setting land apart (on a
    # shared CPU the code may also have moved between runs; see RESULTS.md)
    "mae_repeat": [],
}


def get_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase", default="all", choices=["all", "pretrain", "analyze", "report"])
    p.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of: " + ", ".join(RUNS))
    p.add_argument("--work_dir", default=os.path.join(tempfile.gettempdir(), "collapse_study"))
    p.add_argument("--tars", default=DEFAULT_TARS, help="folder with train.tar.gz and val.tar.gz")
    p.add_argument("--data_path", default=None, help="unpacked ImageFolder root (skips unpacking)")
    p.add_argument("--model", default="mae_vit_tiny_patch16")
    p.add_argument("--input_size", default=64, type=int)
    p.add_argument("--patch_size", default=16, type=int)
    p.add_argument("--epochs", default=1, type=int)
    p.add_argument("--images_per_class", default=250, type=int,
                   help="pretrain on this many train images per class (0 = all 500)")
    p.add_argument("--threads", default=1, type=int,
                   help="torch threads per run (1 is the most efficient on a shared, busy CPU)")
    p.add_argument("--batch_size", default=128, type=int)
    p.add_argument("--blr", default=1.5e-3, type=float)
    p.add_argument("--warmup_epochs", default=0.1, type=float)
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--num_workers", default=1, type=int)
    p.add_argument("--train_images", default=10000, type=int,
                   help="train images (evenly spaced, all classes) for the kNN bank and the linear fit")
    p.add_argument("--device", default="cpu")
    return p.parse_args()


def unpack(args):
    if args.data_path:
        return args.data_path
    root = os.path.join(args.work_dir, "data")
    if os.path.isdir(os.path.join(root, "val")) and os.path.isdir(os.path.join(root, "train")):
        return root
    os.makedirs(root, exist_ok=True)
    for split in ("train", "val"):
        with tarfile.open(os.path.join(args.tars, f"{split}.tar.gz")) as tar:
            tar.extractall(root, filter="data")
    return root


THREADS = 1


def subset(root, images_per_class):
    """An ImageFolder root whose train/ holds the first N images of each class
    (symlinks) and whose val/ is the full val split."""
    if images_per_class <= 0:
        return root
    sub = os.path.join(os.path.dirname(root), f"data_{images_per_class}pc")
    if os.path.isdir(sub):
        return sub
    tmp = sub + ".tmp"
    os.makedirs(os.path.join(tmp, "train"), exist_ok=True)
    os.symlink(os.path.join(root, "val"), os.path.join(tmp, "val"))
    for wnid in sorted(os.listdir(os.path.join(root, "train"))):
        os.makedirs(os.path.join(tmp, "train", wnid))
        for name in sorted(os.listdir(os.path.join(root, "train", wnid)))[:images_per_class]:
            os.symlink(os.path.join(root, "train", wnid, name), os.path.join(tmp, "train", wnid, name))
    os.rename(tmp, sub)
    return sub


def run(cmd, log_path):
    """Run a command, its output teed to a log file; returns the wall time in seconds."""
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.time()
    with open(log_path, "w") as log:
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(THREADS))
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env)
        for line in proc.stdout:
            log.write(line)
            log.flush()
            if "Epoch" not in line or "total time" in line:  # keep the console short
                sys.stdout.write("    " + line)
        if proc.wait() != 0:
            sys.exit(f"command failed (exit {proc.returncode}); see {log_path}")
    return time.time() - t0


def pretrain(args, name, data):
    out = os.path.join(args.work_dir, name)
    final = os.path.join(out, f"checkpoint-{args.epochs - 1}.pth")
    if os.path.isfile(final):
        print(f"[{name}] pretrained already: {final}")
        return
    os.makedirs(out, exist_ok=True)
    if RUNS[name] is None:
        save_untrained(args, final)
        return
    cmd = [sys.executable, "main_pretrain.py", "--model", args.model, "--input_size", str(args.input_size),
           "--patch_size", str(args.patch_size), "--data_path", data, "--epochs", str(args.epochs),
           "--batch_size", str(args.batch_size), "--blr", str(args.blr), "--warmup_epochs",
           str(args.warmup_epochs), "--seed", str(args.seed), "--num_workers", str(args.num_workers),
           "--device", args.device, "--val_interval", str(args.epochs), "--vis_every", str(args.epochs),
           "--save_every", str(args.epochs), "--print_freq", "25", "--output_dir", out] + RUNS[name]
    wall = run(cmd, os.path.join(out, "pretrain.log"))
    with open(os.path.join(out, "timing.json"), "w") as f:
        json.dump({"pretrain_s": wall, "pretrain_cmd": " ".join(cmd[1:])}, f)


def save_untrained(args, path):
    """A checkpoint of the model as main_pretrain.py initialises it, never trained."""
    sys.path.insert(0, REPO)
    import torch
    from main_pretrain import build_model
    margs = argparse.Namespace(model=args.model, input_size=args.input_size, patch_size=args.patch_size,
                               norm_pix_loss=False, global_pool=False, nb_classes=100)
    torch.manual_seed(args.seed)
    model = build_model(margs)
    saved = {**vars(margs), "mask_ratio": 0.75, "uniformity_mu": 1.0, "centering": False}
    torch.save({"model": model.state_dict(), "args": saved, "epoch": -1}, path)
    with open(os.path.join(os.path.dirname(path), "timing.json"), "w") as f:
        json.dump({"pretrain_s": 0.0, "pretrain_cmd": "(untrained)"}, f)


def analyze(args, name, data):
    out = os.path.join(args.work_dir, name)
    result = os.path.join(out, "analysis.json")
    if os.path.isfile(result):
        print(f"[{name}] analysed already: {result}")
        return
    cmd = [sys.executable, "main_analyze.py", "--checkpoint", os.path.join(out, f"checkpoint-{args.epochs - 1}.pth"),
           "--data_path", data, "--num_workers", str(args.num_workers), "--device", args.device,
           "--batch_size", "256", "--diag_images", "0", "--train_images", str(args.train_images),
           "--output_dir", out, "--out_json", result,
           # TCR measured alike for every run (mu 1, no centering), whatever the run trained with
           "--uniformity_mu", "1", "--centering", "false"]
    wall = run(cmd, os.path.join(out, "analyze.log"))
    path = os.path.join(out, "timing.json")
    timing = json.load(open(path)) if os.path.isfile(path) else {}
    timing.update({"analyze_s": wall, "analyze_cmd": " ".join(cmd[1:])})
    with open(path, "w") as f:
        json.dump(timing, f)


def report(args, names):
    """A markdown table of every finished run."""
    head = ("| run | reg flags | fast-linear top-1 | kNN top-1 | eff. rank | dims99 | uniformity | TCR "
            "| val recon loss | online top-1 | pretrain s | analyze s |\n|" + " --- |" * 12)
    rows = []
    for name in names:
        out = os.path.join(args.work_dir, name)
        try:
            a = json.load(open(os.path.join(out, "analysis.json")))
            t = json.load(open(os.path.join(out, "timing.json")))
        except FileNotFoundError:
            continue
        log = os.path.join(out, "log.txt")
        last = [json.loads(line) for line in open(log)][-1] if os.path.isfile(log) else {}
        d = a["diagnostics"]
        flags = "(untrained)" if RUNS[name] is None else " ".join(RUNS[name]) or "-"
        rows.append(f"| {name} | {flags} | {a['linear']['acc1']:.2f} | {a['knn']['acc1']:.2f} "
                    f"| {d['effective_rank']:.1f} | {d['dims99']} | {d['uniformity']:.4f} | {d['tcr']:.3f} "
                    f"| {a['recon_loss']:.4f} | {last.get('val_online_acc1', float('nan')):.2f} "
                    f"| {t.get('pretrain_s', float('nan')):.0f} | {t.get('analyze_s', float('nan')):.0f} |")
    table = head + "\n" + "\n".join(rows)
    print(table)
    with open(os.path.join(args.work_dir, "table.md"), "w") as f:
        f.write(table + "\n")
    return table


def main():
    args = get_args()
    names = [n for n in args.runs.split(",") if n]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        sys.exit(f"error: unknown run(s) {', '.join(unknown)}; choose from {', '.join(RUNS)}")
    os.makedirs(args.work_dir, exist_ok=True)
    t0 = time.time()
    global THREADS
    THREADS = args.threads
    data = unpack(args) if args.phase != "report" else None
    pretrain_data = subset(data, args.images_per_class) if data else None
    for name in names:
        if args.phase in ("all", "pretrain"):
            pretrain(args, name, pretrain_data)
        if args.phase in ("all", "analyze"):
            analyze(args, name, data)
    report(args, names)
    print(f"study wall time this invocation: {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
