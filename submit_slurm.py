"""Submit main_pretrain.py, main_linprobe.py or main_finetune.py to SLURM.

    python submit_slurm.py --nodes 2 --gpus_per_node 8 --partition gpu --time 72:00:00 -- \\
        main_pretrain.py --model mae_vit_large_patch16 --data_path /data/imagenet \\
        --output_dir /shared/runs/mmae_l --reg tcr --lamb 1e-2 --uniformity_mu 3
    python submit_slurm.py --gpus_per_node 0 --tasks_per_node 2 --cpus_per_task 1 -- \\
        main_pretrain.py ...                          # CPU tasks (gloo), no GPU requested

Writes an sbatch script into OUTPUT_DIR/slurm/ and submits it. sbatch + srun start
one task per GPU (or --tasks_per_node CPU tasks with --gpus_per_node 0); each reads
its rank from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID (util/dist.py). The script's
arguments are parsed and checked here first (its parser and check_args), so a typo or
a bad value fails before anything is queued. The job is requeueable: SLURM sends SIGUSR1
--signal_before seconds before the time limit; the run saves a checkpoint at the next
step boundary, requeues itself, and the requeued job auto-resumes from output_dir.
SIGTERM (preemption, `scontrol requeue`: SLURM requeues the job; `scancel`: it stops)
saves the same checkpoint. --dry_run prints the script without submitting.
"""
import argparse
import importlib
import os
import shlex
import shutil
import subprocess
import sys

from util.errors import UserError, exit_on_user_error

ENTRY_POINTS = ("main_pretrain.py", "main_linprobe.py", "main_finetune.py")
PATH_FLAGS = ("--output_dir", "--data_path", "--log_dir", "--resume", "--finetune", "--class_subset")
NODE_LOCAL = ("/tmp", "/dev/shm", "/var/tmp", "/scratch/local")
REPO = os.path.dirname(os.path.abspath(__file__))
USAGE = "%(prog)s [options] -- SCRIPT [script args]"


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (`error: ...`) and exit code 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def get_args_parser():
    p = Parser("submit_slurm.py", usage=USAGE,
               description="Submit " + ", ".join(ENTRY_POINTS) + " to SLURM as a requeueable job. "
                           "Options for the script go after --.")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus_per_node", type=int, default=8,
                   help="GPUs per node, one task each; 0 = CPU tasks (gloo), no GPU requested")
    p.add_argument("--tasks_per_node", type=int, default=None,
                   help="processes per node (default: --gpus_per_node, or 1 with --gpus_per_node 0); "
                        "with GPUs it must equal --gpus_per_node")
    p.add_argument("--cpus_per_task", type=int, default=10, help="DataLoader workers + 1 per task")
    p.add_argument("--mem_per_gpu", default="60G", help="memory per GPU (GPU jobs)")
    p.add_argument("--mem", default=None,
                   help="memory per node (SLURM's --mem, e.g. 64G); replaces --mem_per_gpu. "
                        "CPU jobs without it get the partition's default")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--time", default="72:00:00", help="time limit per job (the job requeues itself)")
    p.add_argument("--signal_before", type=int, default=120,
                   help="seconds before the time limit at which SLURM sends SIGUSR1")
    p.add_argument("--job_name", default=None)
    p.add_argument("--python", default=None, help="interpreter on the nodes (default: this one)")
    p.add_argument("--master_port", type=int, default=None,
                   help="rendezvous port on the first node (default: 15000 + job id %% 10000, below the "
                        "ephemeral range, so jobs that share a node do not collide)")
    p.add_argument("--dry_run", action="store_true", help="print the sbatch script, submit nothing")
    return p


def option_value(script_args, name):
    for i, a in enumerate(script_args):
        if a == name and i + 1 < len(script_args):
            return script_args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def check_paths(args, script, script_args):
    """Every node must see the same folders: catch the usual mistakes before submitting."""
    if script not in ENTRY_POINTS:
        raise UserError(f"script must be one of {', '.join(ENTRY_POINTS)}, got {script!r}")
    out = option_value(script_args, "--output_dir")
    if out is None:
        raise UserError("pass --output_dir (a folder on a file system every node shares) to the script")
    out = os.path.abspath(out)
    existing = out
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"output_dir {out} is not a folder ({existing} is a file)")
    if any(c in out for c in '"\n'):
        raise UserError(f"output_dir {out!r}: a double quote or newline cannot go in an #SBATCH --output line")
    for opt in ("job_name", "partition", "account", "qos"):  # quoted in their #SBATCH lines
        if any(c in (getattr(args, opt) or "") for c in '"\n'):
            raise UserError(f"--{opt} {getattr(args, opt)!r}: a double quote or newline cannot go in an #SBATCH line")
    if args.nodes > 1 and out.startswith(NODE_LOCAL):
        raise UserError(f"output_dir {out} is node-local; with {args.nodes} nodes it must be on a shared file system")
    data = option_value(script_args, "--data_path")
    if data is not None and not os.path.exists(data):  # a folder, a shard root or a file list
        raise UserError(f"data_path {data} does not exist here; it must be on a file system every node sees")
    if args.nodes > 1 and REPO.startswith(NODE_LOCAL):  # fine only if every node has the same copy there
        print(f"warning: the code lives in node-local {REPO}; every node needs the same copy at this path",
              file=sys.stderr)
    return out


def check_script_args(script, script_args):
    """Parse the script's arguments with its own parser and run its own checks
    (check_args: values, model name, files), so a misspelt flag or a bad value fails
    here (one line, exit 2) instead of after the job waited in the queue."""
    try:
        module = importlib.import_module(script[:-len(".py")])
    except ImportError as e:  # e.g. this interpreter lacks torch while --python names one that has it
        print(f"warning: could not check the arguments of {script} here ({e})", file=sys.stderr)
        return
    parser = module.get_args_parser()

    def error(message):
        raise UserError(f"{script}: {message} (see python {script} --help)")

    parser.error = error
    parsed = parser.parse_args(script_args)
    parsed.device = "cpu"  # the nodes' GPUs are not visible here
    try:
        notes = module.check_args(parsed)
    except UserError as e:
        raise UserError(f"{script}: {e}") from None
    for note in notes:  # stderr: a --dry_run's stdout stays the sbatch script
        print(f"note: {script}: {note}", file=sys.stderr)


def absolute_paths(script_args):
    """The job starts in another working directory: make path values absolute
    (`--flag value` and `--flag=value`)."""
    out = []
    for prev, a in zip([None] + script_args[:-1], script_args):
        flag, eq, value = a.partition("=")
        if prev in PATH_FLAGS:
            a = os.path.abspath(a)
        elif eq and flag in PATH_FLAGS:
            a = f"{flag}={os.path.abspath(value)}"
        out.append(a)
    return out


def tasks_per_node(args):
    if args.nodes < 1 or args.gpus_per_node < 0 or args.cpus_per_task < 1:
        raise UserError("--nodes and --cpus_per_task must be >= 1 and --gpus_per_node >= 0")
    tasks = args.tasks_per_node if args.tasks_per_node is not None else args.gpus_per_node or 1
    if tasks < 1:
        raise UserError(f"--tasks_per_node must be >= 1, got {tasks}")
    if args.gpus_per_node and tasks != args.gpus_per_node:
        raise UserError(f"one task per GPU: --tasks_per_node {tasks} must equal --gpus_per_node "
                        f"{args.gpus_per_node} (or pass --gpus_per_node 0 for CPU tasks)")
    return tasks


def log_pattern(output_dir, name):
    """An #SBATCH file pattern for output_dir/slurm/name: double-quoted (sbatch splits an
    #SBATCH line at spaces outside quotes) with a literal % doubled (%j etc. are patterns)."""
    return '"' + os.path.join(output_dir.replace("%", "%%"), "slurm", name) + '"'


def sbatch_script(args, script, script_args, output_dir):
    python = args.python or sys.executable
    ntasks = tasks_per_node(args)
    script_args = absolute_paths(script_args)
    lines = ["#!/bin/bash",
             f'#SBATCH --job-name="{args.job_name or script.replace("main_", "").replace(".py", "")}"',
             f"#SBATCH --nodes={args.nodes}",
             f"#SBATCH --ntasks-per-node={ntasks}"]
    if args.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={args.gpus_per_node}")
    lines.append(f"#SBATCH --cpus-per-task={args.cpus_per_task}")
    if args.mem:
        lines.append(f"#SBATCH --mem={args.mem}")
    elif args.gpus_per_node:
        lines.append(f"#SBATCH --mem-per-gpu={args.mem_per_gpu}")
    lines += [f"#SBATCH --time={args.time}",
              f"#SBATCH --signal=USR1@{args.signal_before}",
              "#SBATCH --requeue",
              "#SBATCH --open-mode=append",
              f"#SBATCH --output={log_pattern(output_dir, '%j.out')}",
              f"#SBATCH --error={log_pattern(output_dir, '%j.err')}"]
    for opt in ("partition", "account", "qos"):
        if getattr(args, opt):
            lines.append(f'#SBATCH --{opt}="{getattr(args, opt)}"')  # sbatch splits at spaces outside quotes
    port = args.master_port or "$((15000 + SLURM_JOB_ID % 10000))"
    lines += ["",
              "set -euo pipefail",
              'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
              f"export MASTER_PORT={port}",
              "export OMP_NUM_THREADS=1",
              f"cd {shlex.quote(REPO)}",
              "# a requeued job runs the same command and auto-resumes from output_dir.",
              "# --cpus-per-task again: srun of SLURM 22.05 does not inherit it from sbatch, and a task",
              "# bound to one CPU would starve its DataLoader workers.",
              f"srun --kill-on-bad-exit=1 --cpus-per-task={args.cpus_per_task} " + " ".join(
                  shlex.quote(x) for x in [python, os.path.join(REPO, script), *script_args]),
              ""]
    return "\n".join(lines)


@exit_on_user_error
def main(argv):
    split = argv.index("--") if "--" in argv else len(argv)
    if split == len(argv) and any(a.endswith(".py") for a in argv):
        raise UserError("put -- between the launcher's options and the script: "
                        "submit_slurm.py [options] -- SCRIPT [script args]")
    args = get_args_parser().parse_args(argv[:split])  # --help prints the options and exits here
    rest = argv[split + 1:]
    if not rest:
        raise UserError("name the script to run after --: submit_slurm.py [options] -- SCRIPT [script args]")
    script, script_args = os.path.basename(rest[0]), rest[1:]
    tasks_per_node(args)
    output_dir = check_paths(args, script, script_args)
    check_script_args(script, script_args)
    text = sbatch_script(args, script, script_args, output_dir)
    if args.dry_run:
        print(text)
        return
    if shutil.which("sbatch") is None:
        raise UserError("sbatch not found: run this on a SLURM login node (or use --dry_run)")
    os.makedirs(os.path.join(output_dir, "slurm"), exist_ok=True)
    path = os.path.join(output_dir, "slurm", "job.sbatch")
    with open(path, "w") as f:
        f.write(text)
    res = subprocess.run(["sbatch", path], capture_output=True, text=True)
    if res.returncode != 0:
        raise UserError(f"sbatch failed: {res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode}")
    print(res.stdout.strip(), f"(script {path}; logs in {output_dir}/slurm/)")


if __name__ == "__main__":
    main(sys.argv[1:])
