"""Two Linux network namespaces joined by a veth pair: a verifier box and a drafter box."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys


class NetnsUnavailable(RuntimeError):
    pass


def _ip(*args, ns=None):
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise NetnsUnavailable(f"`{' '.join(cmd)}` failed: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


class TwoBoxes:
    """`verifier` and `drafter` namespaces at 10.77.N.1 and 10.77.N.2; `delay` tells how delay is made."""

    def __init__(self, netem: str = "delay 2ms"):
        if os.geteuid() != 0:
            raise NetnsUnavailable("network namespaces need root")
        if not shutil.which("ip"):
            raise NetnsUnavailable("iproute2's `ip` is not installed")
        n = os.getpid() % 200 + 20
        self.verifier, self.drafter = f"spxv{os.getpid()}", f"spxd{os.getpid()}"
        self.verifier_ip, self.drafter_ip = f"10.77.{n}.1", f"10.77.{n}.2"
        self._veth = (f"spxa{os.getpid()}"[:15], f"spxb{os.getpid()}"[:15])
        try:
            _ip("ip", "netns", "add", self.verifier)
            _ip("ip", "netns", "add", self.drafter)
            _ip("ip", "link", "add", self._veth[0], "type", "veth", "peer", "name", self._veth[1])
            for dev, ns, ip in ((self._veth[0], self.verifier, self.verifier_ip),
                                (self._veth[1], self.drafter, self.drafter_ip)):
                _ip("ip", "link", "set", dev, "netns", ns)
                _ip("ip", "addr", "add", f"{ip}/24", "dev", dev, ns=ns)
                _ip("ip", "link", "set", dev, "up", ns=ns)
                _ip("ip", "link", "set", "lo", "up", ns=ns)
        except NetnsUnavailable:
            self.close()
            raise
        self.netem = None
        try:
            for dev, ns in ((self._veth[0], self.verifier), (self._veth[1], self.drafter)):
                _ip("tc", "qdisc", "add", "dev", dev, "root", "netem", *netem.split(), ns=ns)
            self.netem = netem
        except NetnsUnavailable as err:
            self.netem_error = str(err)

    def drop_randomly(self, probability: float) -> None:
        """Packet loss without netem: each box drops this share of the packets arriving on its
        veth end (iptables' `statistic` match). Raises NetnsUnavailable where that is missing."""
        if not shutil.which("iptables"):
            raise NetnsUnavailable("iptables is not installed")
        for dev, ns in ((self._veth[0], self.verifier), (self._veth[1], self.drafter)):
            _ip("iptables", "-A", "INPUT", "-i", dev, "-m", "statistic", "--mode", "random",
                "--probability", str(probability), "-j", "DROP", ns=ns)

    def dropped_packets(self) -> int:
        """Packets the drop_randomly rules have discarded so far, both boxes together."""
        total = 0
        for ns in (self.verifier, self.drafter):
            for line in _ip("iptables", "-L", "INPUT", "-v", "-x", "-n", ns=ns).splitlines():
                if "DROP" in line and "statistic" in line:
                    total += int(line.split()[0])
        return total

    def popen(self, ns: str, args: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, *args], **kw)

    def close(self):
        for ns in (self.verifier, self.drafter):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
