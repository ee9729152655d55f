"""Analyse a pretraining checkpoint: is the representation collapsing?

Prints the feature diagnostics (effective rank, dims99, uniformity, TCR), weighted
kNN accuracy, a fast linear evaluation on frozen features, and the val
reconstruction loss; writes the singular value spectrum and a reconstruction grid.

    python main_analyze.py --checkpoint output_dir/checkpoint-399.pth --data_path /imagenet
    python main_analyze.py --checkpoint mae_pretrain_vit_base.pth --model mae_vit_base_patch16 \
        --data_path /imagenet                      # official encoder-only file: no reconstructions
    torchrun --nproc_per_node 8 main_analyze.py --checkpoint ... --data_path /imagenet

On unlabeled data (--labels none, or a file list without labels) the kNN and linear
evaluation are skipped, said once; the rest needs no labels. Without val/, the val
images are the run's held-out ones (--holdout defaults to the checkpoint's).

Model, input/patch size and regulariser settings default to those stored in
the checkpoint's args; an official MAE checkpoint stores none, so pass --model.
"""
import json
import os

import torch

import models_mae
from util.checkpoint import load_checkpoint
from util.cli import Parser, add_bool, add_common_args, check_common_args, resolve_num_workers, seed_everything
from util.datasets import build_dataset, check_nb_classes, eval_loader, eval_transform, readable_subset
from monitors.diagnostics import (FeatureStats, diag_subset, feature_stats, reconstruction_loss, spectrum_plot,
                                  summary_line)
from monitors.fast_linear import LABEL, fast_linear_eval
from monitors.features import extract_features
from monitors.knn import knn_accuracy
from util.dist import all_gather_padded, all_reduce_sum, cleanup, init_distributed_mode, is_main_process
from util.errors import UserError, exit_on_user_error
from util.pos_embed import interpolate_pos_embed
from util.vis import save_reconstructions

# Settings read from the checkpoint's args when not given on the command line.
FROM_CHECKPOINT = {"model": None, "input_size": 224, "patch_size": None, "global_pool": False,
                   "norm_pix_loss": False, "mask_ratio": 0.75, "uniformity_mu": 1.0, "centering": False,
                   "depth": None, "decoder_embed_dim": None, "decoder_depth": None, "decoder_num_heads": None,
                   "decoder_mlp_ratio": None,
                   "holdout": 0.01}  # the run's held-out images, for a source without val/
SHAPE_KEYS = ("patch_size", "depth", "decoder_embed_dim", "decoder_depth", "decoder_num_heads", "decoder_mlp_ratio")
POOLS = ("cls", "avg")


def get_args_parser():
    parser = Parser("Diagnostics, kNN and fast linear evaluation of a pretraining checkpoint", add_help=True)
    add_common_args(parser, batch_size=256, epochs=1, input_size=224)
    parser.set_defaults(output_dir=None, **{k: None for k in FROM_CHECKPOINT})
    g = parser.add_argument_group("analysis")
    g.add_argument("--checkpoint", required=True, help="ours ({'model', 'args', ...}) or official MAE")
    g.add_argument("--model", help=", ".join(models_mae.MODELS) + " (default: from the checkpoint)")
    g.add_argument("--patch_size", type=int, help="override the model's patch size")
    for k in SHAPE_KEYS[1:]:
        g.add_argument(f"--{k}", type=float if k.endswith("ratio") else int, help=f"override the model's {k}")
    add_bool(g, "--global_pool", None, "analyse the mean patch token instead of cls")
    g.add_argument("--pools", default=None,
                   help="comma-separated feature poolings to analyse, of cls and avg (default: the one "
                        "--global_pool names); the first is the headline result, each gets results['pools']")
    add_bool(g, "--norm_pix_loss", None, "the model reconstructs normalised patches")
    g.add_argument("--mask_ratio", type=float, help="for the reconstruction loss and grid")
    g.add_argument("--uniformity_mu", type=float, help="mu of the TCR value")
    add_bool(g, "--centering", None, "centre the features in the TCR value")
    g.add_argument("--diag_images", default=0, type=int, help="val images for the diagnostics (0 = all)")
    g.add_argument("--train_images", default=50000, type=int,
                   help="train images (evenly spaced, all classes) for the kNN bank and the linear fit: "
                        "default 50,000, which bounds ImageNet's fits to minutes on one GPU (0 = all; "
                        "all 1.28M take hours on a CPU)")
    add_bool(g, "--knn", True, "weighted kNN accuracy")
    g.add_argument("--knn_k", default=20, type=int)
    g.add_argument("--knn_t", default=0.07, type=float, help="kNN temperature")
    add_bool(g, "--linear", True, "fast linear evaluation on frozen features")
    g.add_argument("--out_json", default=None, help="also write the results here (JSON)")
    return parser


def resolve_args(args, state):
    """Fill unset settings from the checkpoint's args, then check everything; returns the notes."""
    saved = state.get("args") if isinstance(state.get("args"), dict) else {}
    for k, default in FROM_CHECKPOINT.items():
        if getattr(args, k) is None:
            setattr(args, k, saved.get(k, default))
    if args.model is None:
        raise UserError(f"checkpoint {args.checkpoint} does not name its model; pass --model "
                        f"({', '.join(models_mae.MODELS)})")
    if args.model not in models_mae.MODELS:
        raise UserError(f"unknown --model {args.model}; choose from {', '.join(models_mae.MODELS)}")
    if not 0 <= args.mask_ratio < 1:
        raise UserError(f"--mask_ratio must be in [0, 1), got {args.mask_ratio}")
    if args.knn_k < 1 or args.knn_t <= 0:
        raise UserError("--knn_k must be >= 1 and --knn_t > 0")
    if args.output_dir is None:
        args.output_dir = os.path.dirname(os.path.abspath(args.checkpoint))
    args.pools = [p for p in (args.pools or ("avg" if args.global_pool else "cls")).split(",") if p]
    if not args.pools or any(p not in POOLS for p in args.pools):
        raise UserError(f"--pools must name some of {', '.join(POOLS)}, got {','.join(args.pools)}")
    return check_common_args(args)  # notes (MAE's flags that mean nothing here)


def build_model(args, sd):
    kwargs = dict(img_size=args.input_size, norm_pix_loss=args.norm_pix_loss, global_pool=args.global_pool)
    kwargs.update({k: getattr(args, k) for k in SHAPE_KEYS if getattr(args, k)})
    head = sd.get("online_head.weight")
    kwargs["nb_classes"] = head.shape[0] if head is not None else args.nb_classes
    try:
        return models_mae.MODELS[args.model](**kwargs)
    except ValueError as e:
        raise UserError(str(e)) from None


def load_weights(model, sd, path):
    """Load with strict=False; the encoder must be complete, the decoder and the
    online head may be absent (official files hold the encoder only).
    Returns whether the decoder was loaded."""
    sd = dict(sd)
    grid = model.patch_embed.grid_size[0]
    for k in ("pos_embed", "decoder_pos_embed"):  # fixed sin-cos; resize for another input size
        if k in sd and sd[k].shape != getattr(model, k).shape:
            try:
                sd[k] = interpolate_pos_embed(sd[k], grid)
            except ValueError as e:
                raise UserError(f"checkpoint {path}: {e}") from None
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatch: another model size or patch size
        detail = " ".join(str(e).split())[:300]
        raise UserError(f"checkpoint {path} does not fit --model {model.__class__.__name__}: {detail}") from None
    optional = ("decoder", "mask_token", "online_head")
    bad = [k for k in missing if not k.startswith(optional)]
    if bad or unexpected:
        raise UserError(f"checkpoint {path} does not fit the model: missing {bad[:4]}, "
                        f"unexpected {sorted(unexpected)[:4]}")
    decoder_missing = [k for k in missing if k.startswith(("decoder", "mask_token"))]
    if missing:
        print(f"not in the checkpoint (left at their initialisation): {len(decoder_missing)} decoder keys, "
              f"{len(missing) - len(decoder_missing)} online head keys")
    return not decoder_missing


def subset(dataset, n):
    return diag_subset(dataset, n) if n else dataset


def gather_all(x):
    """Every rank's rows in dataset order: rank r's ShardSampler shard holds items
    r, r + W, r + 2W, ..., so its j-th row goes to position r + W*j. The linear fit
    then sees exactly what one process sees."""
    counts = all_gather_padded(torch.tensor([x.shape[0]], device=x.device), 1).flatten().tolist()
    rows = all_gather_padded(x, max(counts))
    out = x.new_empty((sum(counts),) + x.shape[1:])
    for r, c in enumerate(counts):
        out[r::len(counts)] = rows[r, :c]
    return out


@exit_on_user_error
def main(args):
    state = load_checkpoint(args.checkpoint)
    sd = state.get("model") if isinstance(state, dict) else None
    if not isinstance(sd, dict):
        raise UserError(f"checkpoint {args.checkpoint} has no 'model' entry with a state dict")
    notes = resolve_args(args, state)
    device = init_distributed_mode(args)
    for note in notes:
        print(f"note: {note}")
    print(resolve_num_workers(args))
    seed_everything(args.seed)

    dataset_val = build_dataset(args, "val", eval_transform(args.input_size))
    if args.skip_bad_images:
        dataset_val = readable_subset(dataset_val, args)
    if len(dataset_val) < 2:
        raise UserError(f"{len(dataset_val)} val image: the diagnostics need 2 or more "
                        "(a held-out split: raise --holdout)")
    check_nb_classes(args, dataset_val)
    if not getattr(dataset_val, "classes", True) and (args.knn or args.linear):  # --labels none: labels -1
        print("unlabeled data: kNN and linear evaluation skipped (they need labels); the diagnostics, "
              "reconstruction loss and pictures need none")
        args.knn = args.linear = False
    model = build_model(args, sd)
    has_decoder = load_weights(model, sd, args.checkpoint)
    model.to(device).eval()
    print(f"analysing {args.checkpoint}: {args.model} at {args.input_size} px, patch {model.patch_size}, "
          f"features: {', '.join(args.pools)}; {len(dataset_val)} val images")
    results = {"checkpoint": args.checkpoint, "model": args.model, "epoch": state.get("epoch")}

    # Val (and train) features once per pool, from one encoder pass per batch.
    pools = [p == "avg" for p in args.pools]  # as global_pool values
    val_x, val_y = extract_features(model, eval_loader(dataset_val, args), device, args.amp, pools)
    val_x = val_x if len(pools) > 1 else [val_x]
    if args.knn or args.linear:
        full_train = build_dataset(args, "train", eval_transform(args.input_size))
        dataset_train = subset(full_train, args.train_images)
        print(f"kNN bank and linear fit: {len(dataset_train):,} of {len(full_train):,} train images "
              f"(evenly spaced; --train_images)")
        if args.skip_bad_images:  # said after the pick: its unreadable ones are left out of it
            dataset_train = readable_subset(dataset_train, args, "bank")
        train_x, train_y = extract_features(model, eval_loader(dataset_train, args), device, args.amp, pools)
        train_x = train_x if len(pools) > 1 else [train_x]
    results["pools"] = {}
    for i, pool in enumerate(args.pools):
        print(f"-- {pool} features")
        res = results["pools"][pool] = {}
        if args.diag_images and args.diag_images < len(dataset_val):
            diag = feature_stats(model, eval_loader(diag_subset(dataset_val, args.diag_images), args), device,
                                 args.amp, args.uniformity_mu, args.centering, pool == "avg")
        else:
            stats = FeatureStats(val_x[i].shape[1], device)
            for chunk in val_x[i].split(1024):
                stats.update(chunk)
            diag = stats.all_reduce().compute(args.uniformity_mu, args.centering)
        print("diagnostics: " + summary_line(diag))
        res["diagnostics"] = {k: v for k, v in diag.items() if k != "singular_values"}
        res["diagnostics"]["singular_values"] = diag["singular_values"].tolist()
        if args.knn:
            knn = knn_accuracy(train_x[i], train_y, val_x[i], val_y, args.nb_classes, args.knn_k, args.knn_t)
            print(f"kNN (k={knn['k']}, T={args.knn_t}, cosine; bank {len(dataset_train)} train images): "
                  f"top-1 {knn['acc1']:.2f}  top-5 {knn['acc5']:.2f}")
            res["knn"] = knn
        if args.linear:
            # Every rank fits the same gathered features on its own device (the GPU where
            # there is one): no rank waits in a collective, into the process-group
            # timeout, while rank 0 alone fits; rank 0 reports.
            tx, ty, vx, vy = (gather_all(t) for t in (train_x[i], train_y, val_x[i], val_y))
            lin = fast_linear_eval(tx, ty, vx, vy, args.nb_classes)
            print(f"{LABEL}: logistic top-1 {lin['logreg']['acc1']:.2f} top-5 {lin['logreg']['acc5']:.2f} "
                  f"(wd {lin['logreg']['weight_decay']:g}); ridge top-1 {lin['ridge']['acc1']:.2f} "
                  f"(lambda {lin['ridge']['lambda']:g}); fit on {lin['n_train']} train images")
            res["linear"] = lin
        if i == 0:  # the headline pool's results also at the top level
            results.update(res)
            headline_diag = diag

    if has_decoder:
        results["recon_loss"] = reconstruction_loss(model, dataset_val, device, args)
        print(f"reconstruction loss on {len(dataset_val)} val images at mask ratio {args.mask_ratio}: "
              f"{results['recon_loss']:.4f}")
    else:
        results["recon_loss"] = None
        print("no decoder in the checkpoint: reconstruction loss and pictures skipped")

    if is_main_process():
        os.makedirs(args.output_dir, exist_ok=True)
        path = os.path.join(args.output_dir, "spectrum.png")
        diag = headline_diag
        spectrum_plot(diag["singular_values"], f"{os.path.basename(args.checkpoint)}: "
                      f"erank {diag['effective_rank']:.1f}, dims99 {diag['dims99']}").save(path)
        print(f"spectrum written to {path}")
        if has_decoder:
            picks = diag_subset(dataset_val, 8)  # spread over the (class-sorted) val set
            imgs = torch.stack([picks[i][0] for i in range(len(picks))]).to(device)
            path = save_reconstructions(model, imgs, args.mask_ratio, args.output_dir, "analysis")
            print(f"reconstructions written to {path}")
        if args.out_json:
            with open(args.out_json, "w") as f:
                json.dump(results, f, indent=1)
    cleanup()
    return results


if __name__ == "__main__":
    main(get_args_parser().parse_args())
