"""A real SLURM cluster of separate hosts for the tests (tests/cluster/hosts.py): a
controller host `ctl` (munged, slurmctld; also the login node the tests submit
from) and compute hosts node1, node2, node3 (a slurmd each; jobs of 2 hosts take node1
and node2, node3 is the spare a job requeued after a host failure runs on), from Debian's packages
(tests/cluster/install.sh). The config, munge key and socket, state, spools, logs
and pid files live in one folder of the shared file system, as on a real cluster.

    cluster = SlurmCluster(folder); cluster.start()   # waits until every node is idle
    cluster.run("sbatch", ...)                          # a client command on the login node
    cluster.kill_host("node2")                          # the host crashes: all its processes end
    cluster.stop()                                      # daemons, namespaces and links gone
"""
import os
import re
import shutil
import signal
import subprocess
import time

from hosts import Hosts
from submit_slurm import NODE_LOCAL

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED")


def which(name):
    """Daemons live in /usr/sbin, which a non-login PATH may lack."""
    found = shutil.which(name)
    if found:
        return found
    for d in ("/usr/sbin", "/sbin"):
        if os.access(os.path.join(d, name), os.X_OK):
            return os.path.join(d, name)
    return None


def missing_binaries():
    return [b for b in DAEMONS + CLIENTS if which(b) is None]


def mem_mb():
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) // 1024


class SlurmCluster:
    def __init__(self, root, nodes=("node1", "node2", "node3"), cpus=2):
        self.root = os.path.abspath(root)
        self.cpus = cpus
        self.nodes = list(nodes)
        self.hosts = Hosts(["ctl", *self.nodes])
        self.conf = os.path.join(self.root, "slurm.conf")
        self.munge_socket = os.path.join(self.root, "munge", "munge.sock")
        self.env_vars = {"SLURM_CONF": self.conf}
        self.env = job_env(**self.env_vars)
        self.procs = {}

    def path(self, *parts):
        return os.path.join(self.root, *parts)

    def write_config(self):
        for d in ("munge", "state", "log", *(os.path.join("spool", n) for n in self.nodes)):
            os.makedirs(self.path(d), exist_ok=True)
        os.chmod(self.path("munge"), 0o755)
        key = self.path("munge", "munge.key")
        with open(os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            f.write(os.urandom(1024))
        memory = min(4000, mem_mb() // (2 * len(self.nodes)))
        node_lines = "".join(f"NodeName={n} NodeAddr={self.hosts.addr[n]} CPUs={self.cpus} "
                             f"RealMemory={memory} State=UNKNOWN\n" for n in self.nodes)
        conf = f"""\
ClusterName=maetest
SlurmctldHost=ctl({self.hosts.addr["ctl"]})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays a requeued job's restart (default 120 s)
AuthInfo=socket={self.munge_socket},cred_expire=10
StateSaveLocation={self.path("state")}
# %n: each host's own spool, pid file and log in the shared folder
SlurmdSpoolDir={self.path("spool", "%n")}
SlurmctldPidFile={self.path("slurmctld.pid")}
SlurmdPidFile={self.path("slurmd-%n.pid")}
SlurmctldLogFile={self.path("log", "slurmctld.log")}
SlurmdLogFile={self.path("log", "slurmd-%n.log")}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
# look at pending jobs every 2 s, not every 60 s: a requeued job restarts promptly
SchedulerParameters=sched_interval=2
# the nodes count as configured even if this machine has fewer CPUs
SlurmdParameters=config_overrides
JobRequeue=1
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# the machine is busy: be patient with messages, give tasks time to checkpoint on SIGTERM
MessageTimeout=30
KillWait=60
# a host that stops answering is DOWN (its jobs NODE_FAIL) after this many seconds
SlurmdTimeout=30
MinJobAge=3600
InactiveLimit=0
{node_lines}PartitionName=debug Nodes={",".join(self.nodes)} Default=YES MaxTime=INFINITE State=UP
"""
        with open(self.conf, "w") as f:
            f.write(conf)

    def _spawn(self, name, host, *args):
        log = open(self.path("log", f"{name}.out"), "a")
        self.procs[name] = subprocess.Popen(self.hosts.on(host, which(name.split("@")[0]), *args), stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
                                            start_new_session=True)
        log.close()

    def start(self, timeout=180):
        """Make the hosts, start the daemons on them (children of this process) and wait
        until sinfo shows every node idle."""
        self.hosts.start()
        self.write_config()
        m = self.path("munge")
        self._spawn("munged", "ctl", "--foreground", "--force", f"--socket={self.munge_socket}",
                    f"--key-file={m}/munge.key", f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log",
                    f"--seed-file={m}/munged.seed")
        self._wait(lambda: os.path.exists(self.munge_socket), timeout, "munged to create its socket")
        self._spawn("slurmctld", "ctl", "-D", "-f", self.conf)
        for n in self.nodes:
            self.boot_host(n, wait=False)
        self._wait(lambda: all(self.sinfo_state(n) == "idle" for n in self.nodes), timeout, "the nodes to be idle")

    def boot_host(self, node, wait=True, timeout=180):
        """Start node's slurmd (again, after kill_host) and wait until it takes jobs."""
        self._spawn(f"slurmd@{node}", node, "-D", "-f", self.conf, "-N", node)
        if wait:
            self._wait(lambda: self.sinfo_state(node) == "idle", timeout, f"{node} to be idle")

    def kill_host(self, node):
        """The host crashes: its slurmd, its job steps and their tasks all end at once (SIGKILL)."""
        self.hosts.kill(node)
        proc = self.procs.pop(f"slurmd@{node}", None)
        if proc is not None:
            proc.wait(timeout=60)

    def _wait(self, ready, timeout, what):
        t0 = time.time()
        while time.time() - t0 < timeout:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited while waiting for {what}\n{self.logs()}")
            if ready():
                return
            time.sleep(0.5)
        raise RuntimeError(f"timed out waiting for {what}\n{self.logs()}")

    def logs(self, lines=15):
        out = []
        names = ["munged.out", "slurmctld.out", "slurmctld.log"]
        names += [f"slurmd@{n}.out" for n in self.nodes] + [f"slurmd-{n}.log" for n in self.nodes]
        for name in names:
            path = self.path("log", name)
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    out.append(f"--- {name}\n" + "".join(f.readlines()[-lines:]))
        return "\n".join(out)

    def popen(self, host, *cmd, env=None, **kwargs):
        """Start cmd on host (env: extra variables) as a child of this process."""
        return subprocess.Popen(self.hosts.on(host, *cmd), env={**self.env, **(env or {})}, **kwargs)

    def run(self, *cmd, check=True, timeout=120, host="ctl", env=None):
        """A command on the login node (or on host); returns the CompletedProcess."""
        proc = subprocess.run(self.hosts.on(host, *cmd), env={**self.env, **(env or {})}, capture_output=True,
                              text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def sinfo_state(self, node):
        proc = self.run("sinfo", "-h", "-n", node, "-o", "%T", check=False, timeout=60)
        return proc.stdout.strip() if proc.returncode == 0 else None

    def job(self, job_id):
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, NodeList, ...)."""
        text = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def job_ids(self):
        """Every job slurmctld still remembers (pending, running or ended)."""
        return set(self.run("squeue", "-h", "-t", "all", "-o", "%i").stdout.split())

    def wait_job(self, job_id, until, timeout, poll=1.0):
        """Poll the job until until(info) holds; returns the info."""
        t0 = time.time()
        info = {}
        while time.time() - t0 < timeout:
            info = self.job(job_id)
            if until(info):
                return info
            time.sleep(poll)
        raise AssertionError(f"job {job_id} did not get there in {timeout} s: {info}\n{self.logs()}")

    def wait_done(self, job_id, timeout=900):
        return self.wait_job(job_id, lambda i: i.get("JobState") in FINAL_STATES, timeout)

    def stop(self):
        """Cancel what is left, stop the daemons this object started, then remove the
        hosts (whatever still runs on them is killed)."""
        try:
            if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
                self.run("scancel", "--full", "-u", str(os.getuid()), check=False)
                try:
                    self._wait(lambda: not self.run("squeue", "-h", check=False).stdout.strip(), 120, "jobs to end")
                except RuntimeError:
                    pass
            daemons = sorted(self.procs, key=lambda n: ("slurmd@" not in n, n == "munged"))  # slurmd first
            for name in daemons:
                proc = self.procs[name]
                if proc.poll() is not None:
                    continue
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=30)
            self.procs = {}
        finally:
            self.hosts.stop()


# Runs on several hosts need an output folder every host sees: not node-local /tmp
# (submit_slurm.py refuses that for --nodes > 1), but a folder of the shared file system:
# the checkout's .cluster/, or /srv/mae-test-cluster when the checkout itself is node-local
# (a clone in /tmp, as CI may make).
CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARED = os.environ.get("CLUSTER_SHARED") or (
    "/srv/mae-test-cluster" if CHECKOUT.startswith(NODE_LOCAL) else os.path.join(CHECKOUT, ".cluster"))
CLEAN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK",
             "GPUS_PER_NODE", "BATCH", "ACCUM", "EFF_BATCH")


def job_env(**extra):
    """The environment of a command sent to the cluster: nothing from a launcher around
    pytest, one thread per task, no warnings."""
    env = {k: v for k, v in os.environ.items() if k not in CLEAN_ENV and not k.startswith("SLURM_")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **extra}
