"""Hosts made of Linux network namespaces, for tests of what crosses a network.

One namespace holds a bridge (the "switch"); each host is a namespace joined to it by a
veth pair and has its own address in 192.0.2.0/24 (TEST-NET-1: documentation space,
routed nowhere). Nothing is added to the namespace the tests run in. A link is cut by
taking the switch's end of its veth down; packets are dropped with iptables' statistic
match inside the host (this kernel may have no netem). A host's link can be throttled with
the tbf qdisc on both ends of its veth (``shape``: a rate each way, and added latency where
the kernel has netem). ``close()`` removes every namespace, which takes its veths, bridge,
qdiscs and rules with it.
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

    def shape(self, name: str, mbit: float, latency_ms: float | None = None) -> None:
        """Limit the host's link to ``mbit`` Mbit/s each way (tbf on the host's end for what it
        sends, on the switch's end for what it receives), with ``latency_ms`` of added delay
        each way if given (netem; raises RuntimeError where the kernel lacks it)."""
        ns, _, switch_end = self.hosts[name]
        host_end = switch_end[:-1] + "h"
        burst = max(1600, int(mbit * 1e6 / 8 / 100))  # 10 ms worth of bytes, at least a packet
        for namespace, dev in ((ns, host_end), (self.switch, switch_end)):
            parent = ["root"]
            if latency_ms:
                run("ip", "netns", "exec", namespace, "tc", "qdisc", "add", "dev", dev, "root", "handle", "1:",
                    "netem", "delay", f"{latency_ms}ms")
                parent = ["parent", "1:1"]
            run("ip", "netns", "exec", namespace, "tc", "qdisc", "add", "dev", dev, *parent, "handle", "10:", "tbf",
                "rate", f"{mbit}mbit", "burst", str(burst), "latency", "100ms")

    def unshape(self, name: str) -> None:
        ns, _, switch_end = self.hosts[name]
        for namespace, dev in ((ns, switch_end[:-1] + "h"), (self.switch, switch_end)):
            subprocess.run(["ip", "netns", "exec", namespace, "tc", "qdisc", "del", "dev", dev, "root"],
                           capture_output=True, timeout=30)

    def throughput(self, src: str, dst: str, megabytes: float = 2.0) -> float:
        """Mbit/s of one TCP stream of ``megabytes`` from src to dst (a measure of the link)."""
        code = ("import socket, sys\n"
                "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
                f"s.bind(('{self.address(dst)}', 9000)); s.listen(1); print('ready', flush=True)\n"
                "c, _ = s.accept()\n"
                "while c.recv(1 << 16): pass\n"
                "c.sendall(b'k'); c.close()\n")
        sink = subprocess.Popen([*self.exec_prefix(dst), sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        try:
            sink.stdout.readline()
            send = ("import socket, time\n"
                    f"s = socket.create_connection(('{self.address(dst)}', 9000), timeout=60)\n"
                    f"data = b'x' * {int(megabytes * 1e6)}; t = time.perf_counter(); s.sendall(data)\n"
                    "s.shutdown(socket.SHUT_WR); s.recv(1); print(time.perf_counter() - t)\n")
            out = subprocess.run([*self.exec_prefix(src), sys.executable, "-c", send], capture_output=True, text=True,
                                 timeout=120)
            return megabytes * 8 / float(out.stdout)
        finally:
            sink.kill()
            sink.wait(10)

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
