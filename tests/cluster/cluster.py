"""A two-node DeepSpeed cluster on one Linux machine, for trying and testing the multi-node path.

    python tests/cluster/cluster.py up   --dir /tmp/dsc     # about 2 s; needs root
    python tests/cluster/cluster.py exec --dir /tmp/dsc -- deepspeed --hostfile hostfile ...
    python tests/cluster/cluster.py down --dir /tmp/dsc     # safe to run twice

Each node is a network namespace (joined to the other by a veth pair with the same interface name
inside both, addresses in one private /24, loopback up) holding an ``sshd`` that runs as PID 1 of
its own PID and UTS namespaces::

    ip netns exec NS unshare --uts --pid --fork --mount-proc --kill-child sh -c 'hostname nodeN && exec sshd -D -f CONF'

The PID namespace is what makes this safe on a shared machine: on Ctrl-C or timeout DeepSpeed's pdsh
runner runs ``pkill -f`` for its launchers on every node, which here can only see that node's
processes. Killing a node's sshd (its PID 1) or its ``unshare`` ends everything inside the node,
as pulling its plug would. pdsh resolves the hostfile's names itself before calling ssh, so each
namespace gets ``/etc/netns/<netns>/hosts``, which ``ip netns exec`` mounts over ``/etc/hosts``.

Everything generated lives in ``--dir``: keys, sshd and ssh configs, ``bin/ssh`` (a wrapper that
adds ``-F <config>``, since ssh reads no config path from the environment and the launcher calls
plain ``ssh``), ``hostfile``, ``.deepspeed_env`` and ``cluster.json`` (what ``down`` undoes).
``exec`` runs a command in node1's network namespace, in the launch folder ``--dir``, with the
wrapper first on PATH and the repository on PYTHONPATH: where a user on node1 runs ``deepspeed``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
IFACE = "dseth0"  # the same name inside every node, so one GLOO_SOCKET_IFNAME fits all
STATE = "cluster.json"
SSHD = "/usr/sbin/sshd"
SSH = "/usr/bin/ssh"


@dataclass
class Node:
    name: str       # host name inside the node and in the hostfile
    netns: str      # network namespace name (host-wide, so prefixed with the cluster name)
    addr: str
    pid: int = 0    # the node's ``unshare``; killing it ends the node
    owns_netns: bool = False  # created by this cluster: only then does ``down`` delete it


@dataclass
class Cluster:
    dir: Path
    name: str
    nodes: list[Node]

    @property
    def hostfile(self) -> Path:
        return self.dir / "hostfile"

    @property
    def bin(self) -> Path:
        return self.dir / "bin"

    @property
    def head(self) -> Node:
        return self.nodes[0]

    def save(self) -> None:
        state = {"name": self.name, "nodes": [asdict(n) for n in self.nodes]}
        tmp = self.dir / (STATE + ".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self.dir / STATE)

    @classmethod
    def load(cls, folder: str | Path) -> Cluster | None:
        path = Path(folder) / STATE
        if not path.is_file():
            return None
        state = json.loads(path.read_text())
        return cls(Path(folder), state["name"], [Node(**n) for n in state["nodes"]])

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """The launching shell's environment: wrapper first on PATH, the project importable."""
        env = dict(os.environ if base is None else base)
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        env["OMP_NUM_THREADS"] = "1"
        return env

    def on_head(self, cmd: list[str]) -> list[str]:
        """``cmd`` as run from node1's network (the launcher only needs node1's view of the network)."""
        return ["ip", "netns", "exec", self.head.netns, *cmd]

    def pid_namespace(self, node: Node) -> str | None:
        """The node's PID namespace (``pid:[inode]``), to tell its processes from everyone else's."""
        try:
            return os.readlink(f"/proc/{node.pid}/ns/pid_for_children")
        except OSError:
            return None


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {(result.stderr or result.stdout).strip()}")
    return result


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.write_text(text)
    path.chmod(mode)


def _check_tools() -> None:
    missing = [t for t in ("ip", "unshare", "pdsh", "ssh-keygen") if shutil.which(t) is None]
    missing += [t for t in (SSHD, SSH) if not os.access(t, os.X_OK)]
    if missing:
        raise RuntimeError(f"missing {', '.join(missing)}: run `make cluster-deps` "
                           "(apt-get install openssh-server pdsh iproute2)")
    if os.geteuid() != 0:
        raise RuntimeError("network namespaces need root")


def _sshd_config(c: Cluster, node: Node) -> str:
    return "\n".join([
        f"ListenAddress {node.addr}",
        "Port 22",
        f"HostKey {c.dir / 'host_key'}",
        f"AuthorizedKeysFile {c.dir / 'authorized_keys'}",
        "PidFile none",
        "PermitRootLogin prohibit-password",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "StrictModes no",      # the key lives under a temporary folder
        "PrintMotd no",
        "PrintLastLog no",
        "MaxStartups 100",     # pdsh opens a session per node at once, plus the launcher's checks
        "LogLevel ERROR",
        "",
    ])


def _ssh_config(c: Cluster) -> str:
    hosts = [f"Host {n.name}\n  HostName {n.addr}" for n in c.nodes]
    common = "\n".join([
        "Host *",
        "  User root",
        f"  IdentityFile {c.dir / 'id_ed25519'}",
        "  IdentitiesOnly yes",
        "  BatchMode yes",
        "  StrictHostKeyChecking no",
        "  UserKnownHostsFile /dev/null",
        "  GlobalKnownHostsFile /dev/null",
        "  LogLevel ERROR",
        "  ConnectTimeout 5",
        "  ServerAliveInterval 5",
        "  ServerAliveCountMax 2",
    ])
    return "\n".join(hosts + [common, ""])


def _generate(c: Cluster, slots: int) -> None:
    """Keys and configs; nothing here touches the machine outside ``c.dir``."""
    c.dir.mkdir(parents=True, exist_ok=True)
    for key in ("host_key", "id_ed25519"):
        for suffix in ("", ".pub"):
            (c.dir / (key + suffix)).unlink(missing_ok=True)
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{c.name}-{key}", "-f", str(c.dir / key)])
    _write(c.dir / "authorized_keys", (c.dir / "id_ed25519.pub").read_text(), 0o600)
    for node in c.nodes:
        _write(c.dir / f"sshd_{node.name}.conf", _sshd_config(c, node))
    _write(c.dir / "ssh_config", _ssh_config(c), 0o600)
    c.bin.mkdir(exist_ok=True)
    _write(c.bin / "ssh", f'#!/bin/sh\nexec {SSH} -F {c.dir / "ssh_config"} "$@"\n', 0o755)
    _write(c.hostfile, "".join(f"{n.name} slots={slots}\n" for n in c.nodes))
    # One NAME=value per line and no blank line: DeepSpeed's runner splits every line on '='.
    _write(c.dir / ".deepspeed_env", f"GLOO_SOCKET_IFNAME={IFACE}\nOMP_NUM_THREADS=1\n")


def _hosts_file(c: Cluster, node: Node) -> Path:
    """``ip netns exec`` bind-mounts /etc/netns/<netns>/hosts over /etc/hosts for everything it starts.

    pdsh resolves the hostfile's names itself (gethostbyname) before calling ssh, so the names must
    resolve on the launching node as on a real cluster; this keeps them out of the machine's own /etc/hosts.
    """
    return Path("/etc/netns") / node.netns / "hosts"


def _network(c: Cluster, prefix: str) -> None:
    a, b = c.nodes
    hosts = "127.0.0.1 localhost\n" + "".join(f"{n.addr} {n.name}\n" for n in c.nodes)
    for node in c.nodes:
        _run(["ip", "netns", "add", node.netns])  # fails if the name is taken: another cluster's
        node.owns_netns = True
        c.save()
        _hosts_file(c, node).parent.mkdir(parents=True, exist_ok=True)
        _write(_hosts_file(c, node), hosts)
    # Both ends are created inside their namespaces: no interface ever appears on the host.
    _run(["ip", "link", "add", IFACE, "netns", a.netns, "type", "veth", "peer", "name", IFACE, "netns", b.netns])
    for node in c.nodes:
        _run(["ip", "-n", node.netns, "addr", "add", f"{node.addr}/{prefix}", "dev", IFACE])
        _run(["ip", "-n", node.netns, "link", "set", IFACE, "up"])
        _run(["ip", "-n", node.netns, "link", "set", "lo", "up"])


def _start_node(c: Cluster, node: Node) -> None:
    conf = c.dir / f"sshd_{node.name}.conf"
    _run([SSHD, "-t", "-f", str(conf)])
    log = open(c.dir / f"{node.name}.log", "ab")
    proc = subprocess.Popen(
        ["ip", "netns", "exec", node.netns, "unshare", "--uts", "--pid", "--fork", "--mount-proc",
         "--kill-child", "sh", "-c", f"hostname {node.name} && exec {SSHD} -D -e -f {conf}"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    log.close()
    node.pid = proc.pid  # ``ip netns exec`` execs ``unshare``: same process


def _wait_ready(c: Cluster, timeout: float = 15.0) -> None:
    """Every node answers ssh with its own host name (the launcher's reachability check, and more)."""
    deadline = time.monotonic() + timeout
    for node in c.nodes:
        while True:
            r = subprocess.run(c.on_head([str(c.bin / "ssh"), node.name, "hostname"]),
                               capture_output=True, text=True)
            if r.returncode == 0 and r.stdout.strip() == node.name:
                break
            if time.monotonic() > deadline:
                log = (c.dir / f"{node.name}.log").read_text(errors="replace").strip()
                raise RuntimeError(f"{node.name} ({node.addr}): no ssh after {timeout:.0f} s: "
                                   f"{r.stderr.strip() or r.stdout.strip()} {log}")
            time.sleep(0.1)


def up(folder: str | Path, name: str = "dsseg", subnet: str = "10.77.13", slots: int = 2) -> Cluster:
    """Start the two nodes; on any failure undo what was done and raise."""
    _check_tools()
    folder = Path(folder).resolve()
    if Cluster.load(folder) is not None:
        raise RuntimeError(f"{folder}: a cluster is already up here (run `down` first)")
    nodes = [Node(f"node{i}", f"{name}-node{i}", f"{subnet}.{i}") for i in (1, 2)]
    c = Cluster(folder, name, nodes)
    _generate(c, slots)
    c.save()  # before touching the machine, so that `down` can undo a half-finished `up`
    try:
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege-separation directory
        _network(c, "24")
        for node in nodes:
            _start_node(c, node)
            c.save()
        _wait_ready(c)
    except BaseException:
        down(folder)
        raise
    return c


def node_running(c: Cluster, node: Node) -> bool:
    """Whether the node's ``unshare`` still runs (checked by command line: PIDs get recycled)."""
    pid = node.pid
    if not pid:
        return False
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    alive = stat.rsplit(")", 1)[1].split()[0] != "Z"
    return alive and cmd[0].endswith(b"unshare") and str(c.dir / f"sshd_{node.name}.conf").encode() in b" ".join(cmd)


def _node_init(c: Cluster, node: Node) -> int | None:
    """PID (as the machine sees it) of the node's PID 1, the sshd that ``unshare`` forked."""
    try:
        children = Path(f"/proc/{node.pid}/task/{node.pid}/children").read_text().split()
    except OSError:
        return None
    ns = c.pid_namespace(node)
    for pid in map(int, children):
        try:
            if os.readlink(f"/proc/{pid}/ns/pid") == ns:
                return pid
        except OSError:
            pass
    return None


def kill_node(c: Cluster, node: Node, timeout: float = 10.0) -> None:
    """End one node as a power cut would: SIGKILL its PID 1, and the kernel ends everything inside.

    ``unshare`` then reaps its child and exits; killing ``unshare`` first would work as well
    (``--kill-child``), but would leave sshd for the machine's init to reap.
    """
    if not node_running(c, node):
        return
    init = _node_init(c, node)
    os.kill(init if init is not None else node.pid, signal.SIGKILL)
    for last_resort in (False, True):
        deadline = time.monotonic() + timeout
        while node_running(c, node) and time.monotonic() < deadline:
            try:  # reap it when it is our child (``up`` called in this process)
                os.waitpid(node.pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.05)
        if not node_running(c, node):
            try:  # a zombie child of ours: collect it
                os.waitpid(node.pid, os.WNOHANG)
            except ChildProcessError:
                pass
            return
        if not last_resort:
            os.kill(node.pid, signal.SIGKILL)
    raise RuntimeError(f"{node.name}: unshare (pid {node.pid}) did not exit")


def down(folder: str | Path) -> bool:
    """Stop the nodes this folder's ``up`` started and delete their namespaces; False if none."""
    c = Cluster.load(Path(folder).resolve())
    if c is None:
        return False
    for node in c.nodes:
        kill_node(c, node)
    existing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    for node in c.nodes:
        if not node.owns_netns:
            continue
        if node.netns in existing:  # deleting one end's namespace deletes the veth pair too
            subprocess.run(["ip", "netns", "del", node.netns], capture_output=True)
        hosts = _hosts_file(c, node)
        hosts.unlink(missing_ok=True)
        if hosts.parent.is_dir() and not any(hosts.parent.iterdir()):
            hosts.parent.rmdir()
    (c.dir / STATE).unlink(missing_ok=True)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pu = sub.add_parser("up", help="start node1 and node2")
    pu.add_argument("--dir", required=True, help="folder for keys, configs, hostfile and state")
    pu.add_argument("--name", default="dsseg", help="prefix of the network namespace names")
    pu.add_argument("--subnet", default="10.77.13", help="first three octets of the nodes' private /24")
    pu.add_argument("--slots", type=int, default=2, help="ranks per node in the hostfile")
    pd = sub.add_parser("down", help="stop the nodes and delete the namespaces")
    pd.add_argument("--dir", required=True)
    pe = sub.add_parser("exec", help="run a command on node1 in the launch folder")
    pe.add_argument("--dir", required=True)
    pe.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    try:
        if args.cmd == "up":
            c = up(args.dir, args.name, args.subnet, args.slots)
            for n in c.nodes:
                print(f"{n.name}: {n.addr} (netns {n.netns}, unshare pid {n.pid})")
            print(f"launch folder: {c.dir} (hostfile, .deepspeed_env); "
                  f"run: python {Path(__file__).relative_to(REPO_ROOT)} exec --dir {c.dir} -- deepspeed --hostfile hostfile ...")
            return 0
        if args.cmd == "down":
            print("cluster stopped" if down(args.dir) else f"{args.dir}: no cluster here")
            return 0
        c = Cluster.load(Path(args.dir).resolve())
        if c is None:
            raise RuntimeError(f"{args.dir}: no cluster here (run `up` first)")
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        if not command:
            raise RuntimeError("exec: no command")
        return subprocess.run(c.on_head(command), cwd=c.dir, env=c.env()).returncode
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
