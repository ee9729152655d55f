"""What a new user meets: defaults that would change the experiment are said, MAE's own
documented commands parse, --eval takes the best checkpoint, submit_slurm.py checks
values before queueing, and the launchers read relative paths from the caller's folder."""
import os
import shlex
import subprocess
import sys

import pytest
import torch
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms

import main_finetune
import main_linprobe
import main_pretrain
from conftest import REPO, TINY, assert_one_line_error, free_port, run_script

SCRIPTS = {"main_pretrain.py": main_pretrain, "main_finetune.py": main_finetune, "main_linprobe.py": main_linprobe}


def checked(module, argv):
    """Parse argv with the entry point's parser and run its checks; returns (args, notes)."""
    args = module.get_args_parser().parse_args(argv)
    return args, module.check_args(args)


# ---- --reg without --lamb ------------------------------------------------------------
def test_regulariser_without_lamb_gets_the_published_value(tmp_path):
    out = ["--output_dir", str(tmp_path / "o"), "--device", "cpu"]
    args, notes = checked(main_pretrain, ["--reg", "tcr", *out])
    assert args.lamb == 1e-2 and notes == ["--reg tcr without --lamb: using the published lamb 0.01"]
    args, notes = checked(main_pretrain, ["--reg", "square", *out])  # a published spelling of uniformity
    assert (args.reg, args.lamb) == ("uniformity", 1e-2)
    args, notes = checked(main_pretrain, out)
    assert (args.reg, args.lamb, notes) == ("none", 0.0, [])
    args, notes = checked(main_pretrain, ["--reg", "uniformity", "--lamb", "0.1", *out])
    assert (args.lamb, notes) == (0.1, [])
    args, notes = checked(main_pretrain, ["--reg", "tcr", "--lamb", "0", *out])
    assert args.lamb == 0 and notes == ["--reg tcr with --lamb 0: the regulariser is not computed "
                                        "(plain MAE; loss_reg logs 0)"]


def test_regulariser_default_said_at_start_and_trained(tmp_path):
    proc = run_script("main_pretrain.py", *TINY, "--reg", "tcr", "--output_dir", tmp_path / "o")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "note: --reg tcr without --lamb: using the published lamb 0.01" in proc.stdout
    assert "reg tcr lamb 0.01" in proc.stdout
    state = torch.load(tmp_path / "o" / "checkpoint-0.pth", weights_only=True)
    assert state["args"]["lamb"] == 0.01


# ---- MAE's flags and MAE's documented commands ------------------------------------------
# From facebookresearch/mae PRETRAIN.md and FINETUNE.md (the main_*.py arguments of the
# commands; submitit_*.py's own --job_dir/--nodes/--use_volta32 dropped), with the
# `--local-rank=0` that python -m torch.distributed.launch adds.
MAE_COMMANDS = [
    ("main_pretrain.py", "--batch_size 64 --model mae_vit_large_patch16 --norm_pix_loss --mask_ratio 0.75 "
                         "--epochs 800 --warmup_epochs 40 --blr 1.5e-4 --weight_decay 0.05 --data_path {data}"),
    ("main_finetune.py", "--eval --resume {ft} --model vit_base_patch16 --batch_size 16 --data_path {data}"),
    ("main_finetune.py", "--batch_size 32 --model vit_base_patch16 --finetune {pre} --epochs 100 --blr 5e-4 "
                         "--layer_decay 0.65 --weight_decay 0.05 --drop_path 0.1 --reprob 0.25 --mixup 0.8 "
                         "--cutmix 1.0 --dist_eval --data_path {data}"),
    ("main_finetune.py", "--local-rank=0 --accum_iter 4 --batch_size 32 --model vit_base_patch16 "
                         "--finetune {pre} --epochs 100 --blr 5e-4 --layer_decay 0.65 --weight_decay 0.05 "
                         "--drop_path 0.1 --mixup 0.8 --cutmix 1.0 --reprob 0.25 --dist_eval --data_path {data}"),
    ("main_linprobe.py", "--batch_size 512 --model vit_base_patch16 --cls_token --finetune {pre} --epochs 90 "
                         "--blr 0.1 --weight_decay 0.0 --dist_eval --data_path {data}"),
    # flags of MAE's parsers that its docs do not show
    ("main_pretrain.py", "--world_size 8 --dist_url env://"),
    ("main_finetune.py", "--world_size 8 --color_jitter 0.4 --aa '' --resplit --nb_classes 1000 "
                         "--finetune {pre} --data_path {data}"),
]


# Every option string of the argparse parsers of facebookresearch/mae's main_*.py (commit efb2a80).
MAE_FLAGS = {
    "main_pretrain.py": "--accum_iter --batch_size --blr --data_path --device --dist_on_itp --dist_url --epochs "
                        "--input_size --local_rank --log_dir --lr --mask_ratio --min_lr --model --no_pin_mem "
                        "--norm_pix_loss --num_workers --output_dir --pin_mem --resume --seed --start_epoch "
                        "--warmup_epochs --weight_decay --world_size",
    "main_finetune.py": "--aa --accum_iter --batch_size --blr --clip_grad --cls_token --color_jitter --cutmix "
                        "--cutmix_minmax --data_path --device --dist_eval --dist_on_itp --dist_url --drop_path "
                        "--epochs --eval --finetune --global_pool --input_size --layer_decay --local_rank --log_dir "
                        "--lr --min_lr --mixup --mixup_mode --mixup_prob --mixup_switch_prob --model --nb_classes "
                        "--no_pin_mem --num_workers --output_dir --pin_mem --recount --remode --reprob --resplit "
                        "--resume --seed --smoothing --start_epoch --warmup_epochs --weight_decay --world_size",
    "main_linprobe.py": "--accum_iter --batch_size --blr --cls_token --data_path --device --dist_eval --dist_on_itp "
                        "--dist_url --epochs --eval --finetune --global_pool --local_rank --log_dir --lr --min_lr "
                        "--model --nb_classes --no_pin_mem --num_workers --output_dir --pin_mem --resume --seed "
                        "--start_epoch --warmup_epochs --weight_decay --world_size",
}


@pytest.mark.parametrize("script", sorted(MAE_FLAGS))
def test_every_flag_of_mae_is_known(script):
    known = SCRIPTS[script].get_args_parser()._option_string_actions
    assert [f for f in MAE_FLAGS[script].split() if f not in known] == []


@pytest.mark.parametrize("script,line", MAE_COMMANDS)
def test_mae_documented_commands_parse_and_pass_the_checks(script, line, tmp_path):
    (tmp_path / "imagenet" / "train").mkdir(parents=True)
    (tmp_path / "pre.pth").write_bytes(b"")
    (tmp_path / "ft.pth").write_bytes(b"")
    argv = shlex.split(line.format(data=tmp_path / "imagenet", pre=tmp_path / "pre.pth", ft=tmp_path / "ft.pth"))
    args, notes = checked(SCRIPTS[script], [*argv, "--output_dir", str(tmp_path / "o"), "--device", "cpu"])
    if "--dist_eval" in argv:
        assert args.dist_eval and "--dist_eval ignored" in " ".join(notes)
    if "--world_size" in argv:
        assert "--world_size 8 ignored" in " ".join(notes)


def test_color_jitter_means_what_it_means_in_mae():
    parse = main_finetune.get_args_parser().parse_args
    jitter = [t for t in main_finetune.train_transform(parse(["--color_jitter", "0.4", "--aa", ""])).transforms
              if isinstance(t, transforms.ColorJitter)]
    assert len(jitter) == 1 and jitter[0].brightness == (0.6, 1.4)
    default = main_finetune.train_transform(parse([])).transforms
    assert isinstance(default[0], RandomResizedCropAndInterpolation)
    assert not [t for t in default if isinstance(t, transforms.ColorJitter)]
    args = parse(["--color_jitter", "0.4", "--output_dir", "o", "--device", "cpu"])
    assert "--color_jitter 0.4 has no effect with --aa rand-m9-mstd0.5-inc1" in " ".join(main_finetune.check_args(args))


# ---- --eval without --resume ---------------------------------------------------------------
PROBE = ["--model", "vit_tiny_patch16", "--input_size", "16", "--patch_size", "8", "--batch_size", "16",
         "--synthetic_size", "64", "--num_workers", "0", "--epochs", "2", "--warmup_epochs", "1", "--lr", "5",
         "--print_freq", "100", "--device", "cpu"]


def test_eval_without_resume_takes_the_best_checkpoint(tmp_path):
    out = tmp_path / "probe"
    proc = run_script("main_linprobe.py", *PROBE, "--output_dir", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {"checkpoint-best.pth", "checkpoint-1.pth"} <= set(os.listdir(out))
    proc = run_script("main_linprobe.py", *PROBE, "--eval", "--output_dir", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    best = os.path.join(out, "checkpoint-best.pth")
    assert f"note: --eval without --resume: evaluating {best} (the best val top-1 kept in --output_dir)" \
        in proc.stdout
    os.remove(best)
    proc = run_script("main_linprobe.py", *PROBE, "--eval", "--output_dir", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"evaluating {os.path.join(out, 'checkpoint-1.pth')} (the newest in --output_dir; " \
           "no checkpoint-best.pth there)" in proc.stdout


# ---- submit_slurm.py -------------------------------------------------------------------------
def test_submit_slurm_output_dir_with_equals_is_made_absolute(tmp_path):
    def submit():
        return subprocess.run([sys.executable, os.path.join(REPO, "submit_slurm.py"), "--dry_run", "--",
                               "main_pretrain.py", "--output_dir=rel/run", "--resume=ck.pth", "--data_path", "data"],
                              cwd=tmp_path, capture_output=True, text=True)
    (tmp_path / "data").mkdir()
    assert_one_line_error(submit(), "resume checkpoint ck.pth does not exist")  # checked where it is
    (tmp_path / "ck.pth").write_bytes(b"")
    proc = submit()
    assert proc.returncode == 0, proc.stderr
    srun = [line for line in proc.stdout.splitlines() if line.startswith("srun ")][0]
    assert (f"--output_dir={tmp_path}/rel/run --resume={tmp_path}/ck.pth --data_path {tmp_path}/data"
            in srun), srun
    assert f'#SBATCH --output="{tmp_path}/rel/run/slurm/%j.out"' in proc.stdout.splitlines()


@pytest.mark.parametrize("script,extra,fragment", [
    ("main_pretrain.py", ["--reg", "tcrr"], "main_pretrain.py: unknown --reg 'tcrr'"),
    ("main_pretrain.py", ["--model", "mae_vit_gigantic"], "main_pretrain.py: unknown --model mae_vit_gigantic"),
    ("main_pretrain.py", ["--lamb", "-1"], "main_pretrain.py: --lamb must be >= 0"),
    ("main_pretrain.py", ["--mask_ratio", "1"], "main_pretrain.py: --mask_ratio must be in [0, 1)"),
    ("main_finetune.py", ["--model", "vit_gigantic"], "main_finetune.py: unknown --model vit_gigantic"),
    ("main_finetune.py", ["--layer_decay", "2"], "main_finetune.py: --layer_decay must be in (0, 1]"),
    ("main_linprobe.py", ["--finetune", "/nonexistent.pth"], "main_linprobe.py: pretrained checkpoint"),
    ("main_linprobe.py", ["--eval"], "main_linprobe.py: --eval needs a checkpoint"),
])
def test_submit_slurm_runs_the_scripts_checks_before_queueing(script, extra, fragment, tmp_path):
    proc = run_script("submit_slurm.py", "--dry_run", "--", script, "--output_dir", tmp_path / "o", *extra)
    assert_one_line_error(proc, fragment)
    assert not proc.stdout  # no sbatch script


def test_submit_slurm_says_the_notes():
    proc = run_script("submit_slurm.py", "--dry_run", "--", "main_pretrain.py", "--output_dir", "/shared/x",
                      "--reg", "tcr")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "note: main_pretrain.py: --reg tcr without --lamb: using the published lamb 0.01\n"
    assert proc.stdout.startswith("#!/bin/bash")


# ---- launchers: relative DATA, CKPT, OUTPUT_DIR ---------------------------------------------
def launch(script, cwd, *args, **env):
    full = {**os.environ, "GPUS_PER_NODE": "1", "MASTER_PORT": str(free_port()), "PYTHON": sys.executable,
            "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **env}
    return subprocess.run(["bash", os.path.join(REPO, script), *args, "--device", "cpu"], cwd=cwd, env=full,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("script,env,fragment", [
    ("pretrain.sh", {"DATA": "nodata"}, "data_path {cwd}/nodata does not exist"),
    ("linprobe.sh", {"CKPT": "nope.pth", "OUTPUT_DIR": "out"}, "pretrained checkpoint {cwd}/nope.pth"),
    ("finetune.sh", {"CKPT": "nope.pth", "OUTPUT_DIR": "out"}, "pretrained checkpoint {cwd}/nope.pth"),
    ("finetune.sh", {"CKPT": "/x.pth", "OUTPUT_DIR": "afile"}, "--output_dir {cwd}/afile is not a folder"),
])
def test_launchers_resolve_relative_paths_in_the_callers_folder(script, env, fragment, tmp_path):
    (tmp_path / "afile").write_text("keep")
    proc = launch(script, tmp_path, RECIPE="mae", **env)
    assert proc.returncode != 0
    assert "error: " + fragment.format(cwd=tmp_path) in proc.stderr, proc.stderr[-2000:]


def test_pretrain_sh_writes_to_a_relative_output_dir_of_the_caller(tmp_path):
    # one update per 16 images: TINY's 64 images hold at least one effective batch
    proc = launch("pretrain.sh", tmp_path, *TINY, RECIPE="mmae", OUTPUT_DIR="runs/here",
                  EFF_BATCH="16", BATCH="16", ACCUM="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.path.isfile(tmp_path / "runs" / "here" / "checkpoint-0.pth")


# ---- the shipped ImageNet-100 class list ------------------------------------------------------
def test_imagenet100_list_is_cmcs_100_wnids():
    from util.datasets import read_class_subset
    wnids = read_class_subset(os.path.join(REPO, "imagenet100.txt"))
    assert len(wnids) == len(set(wnids)) == 100
    assert all(w[0] == "n" and len(w) == 9 and w[1:].isdigit() for w in wnids)
    assert wnids[:3] == ["n02869837", "n01749939", "n02488291"] and wnids[-1] == "n02090622"  # CMC's order


def test_main_analyze_says_that_maes_world_size_is_ignored():
    """main_analyze returns check_common_args' notes (printed at start), as the other entry points do."""
    import main_analyze
    args = main_analyze.get_args_parser().parse_args(["--checkpoint", "ckpt.pth", "--world_size", "8",
                                                       "--model", "mae_vit_tiny_patch16"])
    notes = main_analyze.resolve_args(args, {"model": {}})
    assert any("--world_size 8 ignored" in n for n in notes), notes
