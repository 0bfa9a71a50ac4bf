"""Hosts made of Linux network namespaces, for tests of what crosses a network.

One namespace holds a bridge (the "switch"); each host is a namespace joined to it by a
veth pair and has its own address in 192.0.2.0/24 (TEST-NET-1: documentation space,
routed nowhere). Nothing is added to the namespace the tests run in. A link is cut by
taking the switch's end of its veth down; packets are dropped with iptables' statistic
match inside the host (this kernel has no netem). ``close()`` removes every namespace,
which takes its veths, bridge and rules with it.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import uuid

SUBNET = "192.0.2"


def available() -> str | None:
    """None if namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install iproute2 iptables)"
    return None


def run(*args: str) -> str:
    out = subprocess.run(args, capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {out.stderr.strip()}")
    return out.stdout


class Network:
    def __init__(self):
        self.tag = uuid.uuid4().hex[:6]
        self.switch = f"psgd-{self.tag}-sw"
        self.hosts: dict[str, tuple[str, str, str]] = {}  # name -> (namespace, address, switch-side veth)
        run("ip", "netns", "add", self.switch)
        run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", self.switch, "link", "set", "br0", "up")

    def add_host(self, name: str) -> str:
        """A new host on the switch; returns its address."""
        index = len(self.hosts) + 1
        ns, addr = f"psgd-{self.tag}-{name}", f"{SUBNET}.{index}"
        host_end, switch_end = f"v{self.tag}{index}h", f"v{self.tag}{index}s"
        run("ip", "netns", "add", ns)
        run("ip", "link", "add", host_end, "netns", ns, "type", "veth", "peer", "name", switch_end, "netns", self.switch)
        run("ip", "-n", self.switch, "link", "set", switch_end, "master", "br0", "up")
        run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", host_end)
        run("ip", "-n", ns, "link", "set", host_end, "up")
        run("ip", "-n", ns, "link", "set", "lo", "up")
        self.hosts[name] = (ns, addr, switch_end)
        return addr

    def namespace(self, name: str) -> str:
        return self.hosts[name][0]

    def address(self, name: str) -> str:
        return self.hosts[name][1]

    def exec_prefix(self, name: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespace(name)]

    def cut(self, name: str) -> None:
        run("ip", "-n", self.switch, "link", "set", self.hosts[name][2], "down")

    def restore(self, name: str) -> None:
        run("ip", "-n", self.switch, "link", "set", self.hosts[name][2], "up")

    def drop(self, name: str, probability: float) -> None:
        """Drop this fraction of the host's packets, both ways."""
        for chain in ("INPUT", "OUTPUT"):
            run(*self.exec_prefix(name), "iptables", "-A", chain, "-m", "statistic", "--mode", "random",
                "--probability", str(probability), "-j", "DROP")

    def undrop(self, name: str) -> None:
        for chain in ("INPUT", "OUTPUT"):
            run(*self.exec_prefix(name), "iptables", "-F", chain)

    def reachable(self, src: str, dst: str) -> bool:
        """Whether a TCP SYN from src gets an answer from dst (a refusal counts: it came back)."""
        probe = f"import socket; s = socket.socket(); s.settimeout(2); print(s.connect_ex(('{self.address(dst)}', 9)))"
        out = subprocess.run([*self.exec_prefix(src), sys.executable, "-c", probe], capture_output=True, text=True,
                             timeout=30)
        return out.stdout.strip() in ("0", str(errno.ECONNREFUSED))

    def close(self) -> None:
        for ns, _, _ in self.hosts.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", self.switch], capture_output=True, timeout=30)
        self.hosts.clear()


def leftover_namespaces(tag: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(f"psgd-{tag}-")]
