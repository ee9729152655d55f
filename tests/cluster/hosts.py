"""Separate hosts on one machine, as a cluster has them: each host is its own network
namespace (own loopback, own address on a private bridge: 10.213.N.0/24, which no
interface of the machine uses and which is reachable only inside these namespaces)
and its own UTS namespace (own host name); they share the file system as cluster
nodes share their network storage. Every host resolves every host's name: a hosts
file is bind-mounted over /etc/hosts in each host's own mount namespace (the
machine's /etc/hosts is not touched; unlike `ip netns exec`, /sys and its cgroup
mount stay as they are, which slurmd needs). Needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN).

    hosts = Hosts(["ctl", "node1", "node2"]); hosts.start()
    subprocess.run(hosts.on("node1", "hostname"))   # -> node1
    hosts.kill("node2")                               # every process of node2 ends (a host crash)
    hosts.stop()                                      # namespaces, links and hosts file gone
"""
import ipaddress
import os
import shutil
import signal
import subprocess
import tempfile
import time
import zlib


def ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=60)


def used_networks():
    """Every IPv4 network an interface or route of the machine's namespace uses."""
    nets = []
    for line in ip("-o", "-4", "addr", "show").stdout.splitlines():
        nets.append(ipaddress.ip_network(line.split()[3], strict=False))
    for line in ip("-4", "route", "show", "table", "all").stdout.splitlines():
        dest = next((t for t in line.split()[:2] if t[0].isdigit()), None)  # after a type: local, unreachable
        if dest:
            nets.append(ipaddress.ip_network(dest, strict=False))
    return nets


def cannot_create_namespaces():
    """None if network and UTS namespaces can be made here, else why not (one line)."""
    if not all(shutil.which(b) for b in ("ip", "nsenter", "unshare")):
        return "needs `ip` (iproute2), `nsenter` and `unshare` (util-linux)"
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    probe = f"maeprobe{os.getpid()}"
    made = ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot create network namespaces: {made.stderr.strip()}"
    try:
        uts = subprocess.run(["nsenter", f"--net=/run/netns/{probe}", "unshare", "--uts", "--mount",
                              "hostname", "probe"],
                             capture_output=True, text=True, timeout=60)
        if uts.returncode != 0:
            return f"cannot create UTS namespaces: {uts.stderr.strip()}"
    finally:
        ip("netns", "del", probe, check=False)
    return None


class Hosts:
    def __init__(self, names, tag=None):
        self.names = list(names)
        tag = tag or str(os.getpid())
        self.ns = {h: f"mae{tag}-{h}" for h in self.names}
        self.bridge = f"m{tag}br"
        self.links = {h: f"m{tag}v{i}" for i, h in enumerate(self.names)}
        self.network = self._free_network(zlib.crc32(tag.encode()))
        self.addr = {h: str(self.network[10 + i]) for i, h in enumerate(self.names)}
        self.made = []  # what start() created, in order, for stop()

    @staticmethod
    def _free_network(seed):
        used = used_networks()
        for k in range(256):
            net = ipaddress.ip_network(f"10.213.{(seed + k) % 256}.0/24")
            if not any(net.overlaps(u) for u in used):
                return net
        raise RuntimeError("no free 10.213.N.0/24 network for the test hosts")

    def start(self):
        fd, self.hosts_file = tempfile.mkstemp(prefix="hosts-")
        with os.fdopen(fd, "w") as f:
            f.write("127.0.0.1 localhost\n" + "".join(f"{a} {h}\n" for h, a in self.addr.items()))
        self.made.append(("file", self.hosts_file))
        ip("link", "add", self.bridge, "type", "bridge")
        self.made.append(("link", self.bridge))
        ip("link", "set", self.bridge, "up")
        for h in self.names:
            ns = self.ns[h]
            ip("netns", "add", ns)
            self.made.append(("netns", ns))
            ip("link", "add", self.links[h], "type", "veth", "peer", "name", "eth0", "netns", ns)
            self.made.append(("link", self.links[h]))
            ip("link", "set", self.links[h], "master", self.bridge)
            ip("link", "set", self.links[h], "up")
            for cmd in (["addr", "add", f"{self.addr[h]}/24", "dev", "eth0"], ["link", "set", "eth0", "up"],
                        ["link", "set", "lo", "up"]):
                ip("-n", ns, *cmd)

    def on(self, host, *cmd):
        """The command line that runs cmd on host: in its network namespace, with the
        cluster's /etc/hosts and in a UTS namespace named after it."""
        return ["nsenter", f"--net=/run/netns/{self.ns[host]}", "unshare", "--uts", "--mount", "sh", "-c",
                'mount --bind "$1" /etc/hosts && hostname "$0" && shift && exec "$@"', host, self.hosts_file,
                *map(str, cmd)]

    def pids(self, host):
        proc = ip("netns", "pids", self.ns[host], check=False)
        return [int(p) for p in proc.stdout.split()]

    def kill(self, host, timeout=60):
        """Power the host off: SIGKILL to every process in its namespace, until none is left."""
        t0 = time.time()
        while self.pids(host):
            for pid in self.pids(host):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if time.time() - t0 > timeout:
                raise RuntimeError(f"processes of {host} survive SIGKILL: {self.pids(host)}")
            time.sleep(0.2)

    def stop(self):
        """Kill what still runs on the hosts, then remove what start() made (in reverse)."""
        for h in self.names:
            if ("netns", self.ns[h]) in self.made:
                self.kill(h)
        for kind, name in reversed(self.made):
            if kind == "link":
                ip("link", "del", name, check=False)
            elif kind == "netns":
                ip("netns", "del", name, check=False)
            elif kind == "file":
                os.remove(name)
        self.made = []
