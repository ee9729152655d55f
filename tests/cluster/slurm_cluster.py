"""A real one-node SLURM cluster for the tests: munged, slurmctld and slurmd from
Debian's packages (tests/cluster/install.sh), listening on 127.0.0.1 only, with
the config, munge key, state, spool, logs and pid files in one folder.

    cluster = SlurmCluster(folder); cluster.start()   # waits until the node is idle
    subprocess.run(["sbatch", ...], env=cluster.env)  # clients find it via SLURM_CONF
    cluster.stop()
"""
import os
import re
import shutil
import signal
import socket
import subprocess
import time

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


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mem_mb():
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) // 1024


class SlurmCluster:
    def __init__(self, root, cpus=2):
        self.root = os.path.abspath(root)
        self.cpus = cpus
        # slurmd finds its NodeName by the short host name; jobs use it as MASTER_ADDR
        self.node = socket.gethostname().split(".")[0]
        self.conf = os.path.join(self.root, "slurm.conf")
        self.munge_socket = os.path.join(self.root, "munge", "munge.sock")
        self.env_vars = {"SLURM_CONF": self.conf}
        self.env = {**os.environ, **self.env_vars}
        self.procs = {}

    def path(self, *parts):
        return os.path.join(self.root, *parts)

    def write_config(self):
        for d in ("munge", "state", "spool", "log"):
            os.makedirs(self.path(d), exist_ok=True)
        os.chmod(self.path("munge"), 0o755)
        key = self.path("munge", "munge.key")
        with open(os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            f.write(os.urandom(1024))
        memory = min(4000, mem_mb() // 2)
        conf = f"""\
ClusterName=maetest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays a requeued job's restart (default 120 s)
AuthInfo=socket={self.munge_socket},cred_expire=10
StateSaveLocation={self.path("state")}
SlurmdSpoolDir={self.path("spool")}
SlurmctldPidFile={self.path("slurmctld.pid")}
SlurmdPidFile={self.path("slurmd.pid")}
SlurmctldLogFile={self.path("log", "slurmctld.log")}
SlurmdLogFile={self.path("log", "slurmd.log")}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
# look at pending jobs every 2 s, not every 60 s: a requeued job restarts promptly
SchedulerParameters=sched_interval=2
# the node counts as configured even if this machine has fewer CPUs
SlurmdParameters=config_overrides
JobRequeue=1
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# the machine is busy: be patient with messages, give tasks time to checkpoint on SIGTERM
MessageTimeout=60
KillWait=60
MinJobAge=3600
InactiveLimit=0
NodeName={self.node} NodeAddr=127.0.0.1 NodeHostname={self.node} CPUs={self.cpus} RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
"""
        with open(self.conf, "w") as f:
            f.write(conf)

    def _spawn(self, name, *args):
        log = open(self.path("log", f"{name}.out"), "w")
        self.procs[name] = subprocess.Popen([which(name), *args], stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=self.env, start_new_session=True)
        log.close()

    def start(self, timeout=180):
        """Start the daemons in the foreground (children of this process) and wait
        until sinfo shows the node idle."""
        try:  # jobs rendezvous at MASTER_ADDR = the node's name
            socket.gethostbyname(self.node)
        except OSError as e:
            raise RuntimeError(f"host name {self.node} does not resolve ({e}); add it to /etc/hosts") from None
        self.write_config()
        m = self.path("munge")
        self._spawn("munged", "--foreground", "--force", f"--socket={self.munge_socket}",
                    f"--key-file={m}/munge.key", f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log",
                    f"--seed-file={m}/munged.seed")
        self._wait(lambda: os.path.exists(self.munge_socket), timeout, "munged to create its socket")
        self._spawn("slurmctld", "-D", "-f", self.conf)
        self._spawn("slurmd", "-D", "-f", self.conf, "-N", self.node)
        self._wait(lambda: self.sinfo_state() == "idle", timeout, f"node {self.node} to be idle")

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
        for name in ("munged.out", "slurmctld.out", "slurmd.out", "slurmctld.log", "slurmd.log"):
            path = self.path("log", name)
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    out.append(f"--- {name}\n" + "".join(f.readlines()[-lines:]))
        return "\n".join(out)

    def run(self, *cmd, check=True, timeout=120):
        proc = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def sinfo_state(self):
        proc = self.run("sinfo", "-h", "-n", self.node, "-o", "%T", check=False, timeout=60)
        return proc.stdout.strip() if proc.returncode == 0 else None

    def job(self, job_id):
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
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
        """Cancel what is left, then stop the daemons this object started."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--full", "-u", str(os.getuid()), check=False)
            try:
                self._wait(lambda: not self.run("squeue", "-h", check=False).stdout.strip(), 120, "jobs to end")
            except RuntimeError:
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        self.procs = {}
