"""Every command in the fenced shell blocks of README.md, README_mae.md, PRETRAIN.md and
EVAL.md, checked against the tree as it is when the test runs, so that docs and code
cannot drift apart unnoticed.

How each command is checked (`check_command`), by its program:
- a repository script (`python X.py`, `torchrun ... X.py`, `.venv/bin/python X.py`): the
  file must exist and its parser must accept the flags: get_args_parser().parse_args for
  scripts that have one (types and choices too), else the option strings of `X.py --help`.
  Then, for scripts with `check_args` (main_pretrain, main_linprobe, main_finetune): their
  argument checks, with the paths the docs name (/path/to/imagenet, checkpoints, ...)
  replaced by files made here (PATH_FLAGS) and --device cpu. A ViT-Tiny command on
  synthetic data (no --data_path) also runs, with TINY_RUN appended (seconds on a CPU).
  `submit_slurm.py` runs with --dry_run (its own checks and the script's, nothing queued).
  torchrun's own options go through torchrun's parser.
- a launcher (`bash X.sh`): the file exists, the environment variables set before it are
  ones the launcher (or a file it sources) reads (or CHILD_ENV: torch's, NCCL's, ...),
  and its extra arguments parse as arguments of the entry point it starts.
- `make T`: T is a target of the Makefile (not run: the demo takes minutes, test is the suite).
- anything else must be an installed program or in EXTERNAL (SLURM, TensorBoard, shell
  tools), and is not run.
A `...` in a command stands for "more arguments" and is dropped; after a flag that takes a
value it stands for that value (a placeholder).
"""
import functools
import glob
import importlib
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, run_script

DOCS = ("README.md", "README_mae.md", "PRETRAIN.md", "EVAL.md")
SHELL_LANGS = ("bash", "sh", "shell", "console", "")
EXTERNAL = {"scancel", "scontrol", "sbatch", "srun", "squeue", "sinfo", "tensorboard", "tar", "mktemp", "cd",
            "export", "ls", "cat", "echo", "mkdir", "rm", "cp", "mv", "du", "df", "pip", "git", "source", ".",
            "for", "while", "if", "fi", "done", "nvidia-smi", "wget", "curl", "sha256sum", "md5sum", "head",
            "tail", "wc", "find", "unset", "sleep", "kill", "true", "false", "test", "["}
PREFIXES = {"do", "then", "else", "time", "nice", "env", "exec"}
PYTHONS = {"python", "python3", ".venv/bin/python", ".venv/bin/python3"}
TORCHRUNS = {"torchrun", ".venv/bin/torchrun"}
# flag -> kind of placeholder file the argument checks need
PATH_FLAGS = {"--data_path": "dir", "--finetune": "file", "--resume": "file", "--checkpoint": "file",
              "--class_subset": "file"}
TINY_RUN = ["--epochs", "1", "--warmup_epochs", "1", "--synthetic_size", "32", "--batch_size", "16",
            "--accum_iter", "1", "--num_workers", "0", "--print_freq", "100", "--device", "cpu"]
TINY_PRETRAIN = ["--val_interval", "0", "--vis_every", "0", "--diag_images", "0"]


def shell_blocks(doc):
    """(line number, text) of each fenced shell block, continuation lines joined."""
    with open(os.path.join(REPO, doc)) as f:
        text = f.read()
    for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        if m.group(1) in SHELL_LANGS:
            yield text[:m.start()].count("\n") + 2, m.group(2)


def commands(block):
    """Simple commands of a block: lists of words, split at ; && || | and newlines."""
    block = re.sub(r"\\\n", " ", block)
    block = re.sub(r"\$\([^()]*\)", "SUBST", block)  # $(...) command substitution
    for line in block.splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split, lex.commenters = True, "#"
        words = []
        for w in list(lex) + [";"]:
            if w in (";", "&&", "||", "|", "&"):
                if words:
                    yield words
                words = []
            else:
                words.append(w)


def doc_commands():
    out = []
    for doc in DOCS:
        for lineno, block in shell_blocks(doc):
            for words in commands(block):
                out.append(pytest.param(words, id=f"{doc}:{lineno}:{' '.join(words)[:60]}"))
    return out


def split_env(words):
    env = {}
    while words and re.match(r"^[A-Za-z_]\w*=", words[0]):
        k, v = words[0].split("=", 1)
        env[k], words = v, words[1:]
    while words and words[0] in PREFIXES:
        words = words[1:]
    return env, words


def repo_file(path, what):
    full = os.path.join(REPO, path)
    assert os.path.isfile(full), f"{what} {path} does not exist in the tree"
    return full


# ---- entry points -----------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def module_of(script):
    """The imported module of a repository-root script, or None (a script elsewhere)."""
    if os.path.dirname(script):
        return None
    return importlib.import_module(script[:-len(".py")])


@functools.lru_cache(maxsize=None)
def help_flags(script):
    proc = run_script(script, "--help", timeout=120)
    assert proc.returncode == 0, f"{script} --help failed: {proc.stderr[-500:]}"
    return frozenset(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", proc.stdout))


def parser_of(script):
    module = module_of(script)
    if module is None or not hasattr(module, "get_args_parser"):
        return None
    parser = module.get_args_parser()

    def error(message):
        raise AssertionError(f"{script}: {message}")

    parser.error = error
    return parser


def fill_placeholders(script, args):
    """Drop `...`; after a flag that takes a value it becomes a placeholder value."""
    parser = parser_of(script)
    out = []
    for a in args:
        if a != "...":
            out.append(a)
        elif out and out[-1].startswith("--") and "=" not in out[-1]:
            action = parser._option_string_actions.get(out[-1]) if parser else None
            if action is None or action.nargs != 0:
                out.append("PLACEHOLDER")
    return out


def parse(script, args):
    """The script's parser accepts args (a doc flag that does not exist fails here)."""
    repo_file(script, "entry point")
    parser = parser_of(script)
    if parser is not None:
        # exact names only: argparse would also take an abbreviation (--epoch for --epochs)
        inexact = [a.split("=")[0] for a in args if a.startswith("--") and a != "--"
                   and a.split("=")[0] not in parser._option_string_actions]
        assert not inexact, f"{script}: unrecognized arguments: {' '.join(inexact)}"
        return parser.parse_args(args)
    known = help_flags(script)
    unknown = [a.split("=")[0] for a in args if a.startswith("-") and a.split("=")[0] not in known]
    assert not unknown, f"{script} does not know {unknown}"
    return None


def with_local_paths(args, tmp):
    """The docs' input paths (ImageNet, checkpoints) replaced by files made here; a shipped
    file (imagenet100.txt) stays, as its repository path. Output folders stay as written:
    the checks create nothing."""
    (tmp / "data" / "train").mkdir(parents=True, exist_ok=True)
    (tmp / "data" / "val").mkdir(exist_ok=True)
    (tmp / "ckpt.pth").write_bytes(b"")
    out = []
    for i, a in enumerate(args):
        flag, eq, value = a.partition("=")
        if eq and flag in PATH_FLAGS:
            kind = PATH_FLAGS[flag]
        elif not a.startswith("-") and i and args[i - 1] in PATH_FLAGS:
            flag, kind, value = None, PATH_FLAGS[args[i - 1]], a
        else:
            out.append(a)
            continue
        if os.path.isfile(os.path.join(REPO, value)):
            new = os.path.join(REPO, value)
        else:
            new = str(tmp / "data" if kind == "dir" else tmp / "ckpt.pth")
        out.append(f"{flag}={new}" if flag else new)
    return out


def check_entry_point(script, args, tmp, torchrun=False):
    repo_file(script, "entry point")
    args = fill_placeholders(script, args)
    if script == "submit_slurm.py":
        split = args.index("--") if "--" in args else len(args)
        parse(script, args[:split])
        check_entry_point(args[split + 1], args[split + 2:], tmp, torchrun=True)  # parse + checks, no run
        local = with_local_paths(args, tmp)
        proc = run_script(script, *local[:split], "--dry_run", *local[split:], timeout=300)
        assert proc.returncode == 0, f"submit_slurm.py --dry_run: {proc.stderr}"
        assert proc.stdout.startswith("#!/bin/bash")
        return
    parsed = parse(script, args)
    module = module_of(script)
    if module is None or not hasattr(module, "check_args"):
        return
    module.check_args(module.get_args_parser().parse_args(with_local_paths(args, tmp) + ["--device", "cpu"]))
    model = getattr(parsed, "model", "") or ""
    if "_tiny_" in model and parsed.data_path is None and not torchrun:
        extra = TINY_RUN + (TINY_PRETRAIN if script == "main_pretrain.py" else [])
        proc = run_script(script, *with_local_paths(args, tmp), *extra, "--output_dir", tmp / "run", timeout=600)
        assert proc.returncode == 0, f"{script} (tiny run): {proc.stderr[-2000:]}"


def torchrun_split(args):
    """torchrun's own options, checked by torchrun's parser; returns (script, its args)."""
    from torch.distributed.run import get_args_parser
    parser = get_args_parser()

    def error(message):
        raise AssertionError(f"torchrun: {message}")

    parser.error = error
    ns = parser.parse_args(args)
    return ns.training_script, ns.training_script_args


# ---- launchers and make -------------------------------------------------------------------
def launcher_env_vars(path):
    """Variables a launcher reads (itself and the files it sources)."""
    with open(path) as f:
        text = f.read()
    names = set(re.findall(r"\$\{?([A-Za-z_]\w*)", text))
    for src in re.findall(r"^\s*(?:source|\.)\s+(\S+)", text, re.M):
        names |= launcher_env_vars(os.path.join(REPO, src.strip('"')))
    return names


def launcher_entry_point(path):
    with open(path) as f:
        code = "\n".join(line for line in f if not line.lstrip().startswith("#"))
    scripts = [s for s in re.findall(r"([\w/]+\.py)\b", code) if os.path.isfile(os.path.join(REPO, s))]
    assert scripts, f"{path} starts no repository script"
    return scripts[0]


# read by the processes a launcher starts (torch, NCCL, OpenMP, Python), not the launcher
CHILD_ENV = re.compile(r"^(CUDA_|NCCL_|TORCH|OMP_|MKL_|GLOO_|PYTHON|TORCHINDUCTOR_)")


def check_launcher(script, env, args, tmp):
    path = repo_file(script, "launcher")
    unknown = sorted(k for k in set(env) - launcher_env_vars(path) if not CHILD_ENV.match(k))
    assert not unknown, f"{script} does not read {unknown}"
    entry = launcher_entry_point(path)
    parse(entry, fill_placeholders(entry, args))


def make_targets():
    with open(os.path.join(REPO, "Makefile")) as f:
        return set(re.findall(r"^([\w.-]+):", f.read(), re.M))


# ---- one command -----------------------------------------------------------------------------
def check_command(words, tmp):
    env, words = split_env(list(words))
    if not words:
        return "assignment"
    prog, args = words[0], words[1:]
    if prog in PYTHONS and args[:1] == ["-c"]:
        return "external"
    if prog in PYTHONS and args[:1] == ["-m"]:
        if args[1] in ("torch.distributed.run", "torch.distributed.launch"):
            prog, args = "torchrun", args[2:]
        elif args[1] == "pytest":
            for path in [a for a in args[2:] if a.startswith("tests")]:
                assert glob.glob(os.path.join(REPO, path.split("::")[0])), f"{path} does not exist"
            return "pytest"
        else:
            return "external"
    if prog in TORCHRUNS:
        script, script_args = torchrun_split(args)
        check_entry_point(script, script_args, tmp, torchrun=True)
        return "entry point"
    if prog in PYTHONS:
        check_entry_point(args[0], args[1:], tmp)
        return "entry point"
    if prog in ("bash", "sh") or prog.startswith("./"):
        script = prog[2:] if prog.startswith("./") else args[0]
        rest = args if prog.startswith("./") else args[1:]
        check_launcher(script, env, rest, tmp)
        return "launcher"
    if prog == "make":
        missing = [t for t in args if not t.startswith("-") and "=" not in t and t not in make_targets()]
        assert not missing, f"make targets {missing} are not in the Makefile"
        return "make"
    assert prog in EXTERNAL or shutil.which(prog), \
        f"{prog}: not a repository script, launcher or known tool (add it to EXTERNAL if it is a tool)"
    return "external"


@pytest.mark.parametrize("words", doc_commands())
def test_doc_command(words, tmp_path):
    check_command(words, tmp_path)


# ---- the checker itself fails where it must ------------------------------------------------
@pytest.mark.parametrize("line,fragment", [
    ("python main_pretrain.py --no_such_flag 3", "unrecognized arguments: --no_such_flag"),
    ("torchrun --nproc_per_node 2 main_finetune.py --layer_decay 0.5 --bogus", "unrecognized arguments: --bogus"),
    ("python main_pretrain.py --amp fp8", "invalid choice: 'fp8'"),
    ("python main_pretrain.py --reg tcrr", "unknown --reg"),
    ("python main_nothing.py --epochs 1", "entry point main_nothing.py does not exist"),
    ("RECIPE=mae NOSUCHVAR=1 bash pretrain.sh", "does not read ['NOSUCHVAR']"),
    ("RECIPE=mae bash pretrain.sh --epochz 3", "unrecognized arguments: --epochz"),
    ("make nosuchtarget", "not in the Makefile"),
    ("CUDA_VISIBLE_DEVICES=0 RECIPE=mae BATCH=8 bash linprobe.sh --cls_tokn", "unrecognized arguments: --cls_tokn"),
    ("torchrun --gpus 8 main_pretrain.py", "torchrun: unrecognized"),
    ("python main_pretrain.py --epoch 3", "unrecognized arguments: --epoch"),  # argparse would take it
    ("python submit_slurm.py --nodes 2 -- main_pretrain.py --mask_ratio 1 --output_dir /shared/x", "--mask_ratio"),
    ("frobnicate --all", "not a repository script"),
])
def test_checker_catches_drift(line, fragment, tmp_path):
    with pytest.raises(Exception) as e:
        for words in commands(line):
            check_command(words, tmp_path)
    assert fragment in str(e.value), str(e.value)


def test_every_doc_has_commands_and_the_tiny_run_happens(tmp_path, monkeypatch):
    found = {doc: sum(1 for _, b in shell_blocks(doc) for _ in commands(b)) for doc in DOCS}
    assert all(n > 0 for n in found.values()), found
    ran, run = [], run_script
    monkeypatch.setattr(sys.modules[__name__], "run_script", lambda *a, **k: ran.append(a) or run(*a, **k))
    check_command(next(commands("python main_linprobe.py --model vit_tiny_patch16 --input_size 32 "
                                "--patch_size 4 --lr 5")), tmp_path)
    assert ran and ran[0][0] == "main_linprobe.py"
    assert os.path.isfile(tmp_path / "run" / "checkpoint-0.pth")
