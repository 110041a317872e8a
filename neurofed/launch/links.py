"""Shaped links on one machine: each site process in its own network namespace, joined to the
host by a veth pair whose two directions are rate-limited with ``tc`` token-bucket filters.

    host (broker, coordinator)                      namespace nf<tag>-<i>
    bridge nf<tag>b 10.200.X.1/24 -- veth nf<tag>h<i> ==== veth eth0 10.200.X.(10+i)/24 -- neurofed edge
                                     egress: downlink tbf       egress: uplink tbf

The broker listens on every host address, so the sites reach it at the bridge address (the
bundles are provisioned with it as the broker host: it is in the broker certificate's names and
TLS verifies); the coordinator, on the host, reaches the same address over the host's own
loopback path, unshaped (a coordinator and broker on a fast link). ``tbf`` shapes bandwidth only:
no latency or loss is added (``netem`` is not available on these machines), so figures taken here
are labelled "bandwidth only".

Bytes each way are read from the host end's counters
(``/sys/class/net/<veth>/statistics/{tx,rx}_bytes``: tx towards the site, rx from it), so they
count everything on the wire (TLS, MQTT, TCP/IP headers, retransmissions).

Needs root and ``ip`` / ``tc`` (iproute2); :func:`unavailable` says why not where they are
missing. Every namespace, veth and bridge carries a per-instance tag, and :meth:`ShapedLinks.close`
(also on failure, and at interpreter exit) removes exactly those.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from neurofed.errors import NeurofedError
from neurofed.procs import Proc, child_env

__all__ = ["LinkError", "ShapedLinks", "unavailable"]


class LinkError(NeurofedError):
    """Shaped links could not be set up."""


def unavailable() -> str | None:
    """Why network namespaces with shaped veth links cannot be made here, or None if they can."""
    if os.geteuid() != 0:
        return "shaped links need root (network namespaces, veth pairs, tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"shaped links need `{tool}` (iproute2), not found on PATH"
    probe = f"nfprobe{os.getpid() % 100000}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip() or made.returncode}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["ip", *(["netns", "exec", ns, "ip"] if ns else []), *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise LinkError(f"`{' '.join(cmd)}` failed: {done.stderr.strip()}")
    return done


def _tbf(dev: str, mbit: float, ns: str | None = None) -> None:
    """Rate-limit ``dev``'s egress to ``mbit`` Mbit/s. The bucket holds 10 ms at the rate (at
    least 64 KiB, so a TSO segment always fits); the queue 100 ms, beyond which TCP sees drops."""
    burst = max(64 * 1024, int(mbit * 1e6 / 8 * 0.01))
    cmd = [*(["ip", "netns", "exec", ns] if ns else []), "tc", "qdisc", "replace", "dev", dev, "root", "tbf"]
    cmd += ["rate", f"{mbit}mbit", "burst", str(burst), "latency", "100ms"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise LinkError(f"`{' '.join(cmd)}` failed: {done.stderr.strip()}")


def _free_subnet() -> int:
    """X of a 10.200.X.0/24 no interface of this host uses yet."""
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    for x in [*range(100 + os.getpid() % 100, 250), *range(10, 100 + os.getpid() % 100)]:
        if f" 10.200.{x}." not in used:
            return x
    raise LinkError("no free 10.200.X.0/24 subnet on this host")


class ShapedLinks:
    """One namespace and shaped veth per site, a bridge on the host with the broker's address.

    ``uplink_mbit``: site -> broker; ``downlink_mbit``: broker -> site (None: not shaped)."""

    def __init__(self, sites: Sequence[str], uplink_mbit: float | None, downlink_mbit: float | None) -> None:
        if len(sites) > 200:
            raise LinkError("at most 200 shaped sites")
        self.sites = list(sites)
        self.uplink_mbit, self.downlink_mbit = uplink_mbit, downlink_mbit
        self.tag = f"{os.getpid() % 100000:05d}"
        self.bridge = f"nf{self.tag}b"
        self.subnet = 0
        self._made: list[tuple[str, str]] = []  # ("netns"|"link", name), for the teardown
        self._closed = False

    # -- names ---------------------------------------------------------------------------------
    @property
    def broker_host(self) -> str:
        return f"10.200.{self.subnet}.1"

    def netns(self, site: str) -> str:
        return f"nf{self.tag}-{self.sites.index(site)}"

    def host_veth(self, site: str) -> str:
        return f"nf{self.tag}h{self.sites.index(site)}"

    def site_address(self, site: str) -> str:
        return f"10.200.{self.subnet}.{10 + self.sites.index(site)}"

    # -- lifecycle -----------------------------------------------------------------------------
    def __enter__(self) -> ShapedLinks:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> ShapedLinks:
        why = unavailable()
        if why:
            raise LinkError(why)
        atexit.register(self.close)
        try:
            self.subnet = _free_subnet()
            _ip("link", "add", self.bridge, "type", "bridge")
            self._made.append(("link", self.bridge))
            _ip("addr", "add", f"{self.broker_host}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for site in self.sites:
                self._add_site(site)
        except BaseException:
            self.close()
            raise
        return self

    def _add_site(self, site: str) -> None:
        ns, host = self.netns(site), self.host_veth(site)
        peer = f"nf{self.tag}s{self.sites.index(site)}"
        _ip("netns", "add", ns)
        self._made.append(("netns", ns))
        _ip("link", "add", host, "type", "veth", "peer", "name", peer)
        self._made.append(("link", host))  # deleting one end deletes the pair
        _ip("link", "set", peer, "netns", ns)
        _ip("link", "set", peer, "name", "eth0", ns=ns)
        _ip("addr", "add", f"{self.site_address(site)}/24", "dev", "eth0", ns=ns)
        _ip("link", "set", "eth0", "up", ns=ns)
        _ip("link", "set", "lo", "up", ns=ns)
        _ip("link", "set", host, "master", self.bridge)
        _ip("link", "set", host, "up")
        if self.downlink_mbit:
            _tbf(host, self.downlink_mbit)
        if self.uplink_mbit:
            _tbf("eth0", self.uplink_mbit, ns=ns)

    def close(self) -> None:
        """Remove every namespace and link this instance made (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for kind, name in reversed(self._made):
            if kind == "netns":
                subprocess.run(["ip", "netns", "del", name], capture_output=True)
            else:
                subprocess.run(["ip", "link", "del", name], capture_output=True)
        self._made.clear()
        atexit.unregister(self.close)

    # -- use -----------------------------------------------------------------------------------
    def counters(self) -> dict[str, tuple[int, int]]:
        """{site: (bytes sent to the site, bytes received from it)} on its link so far."""
        out = {}
        for site in self.sites:
            stats = Path("/sys/class/net") / self.host_veth(site) / "statistics"
            try:
                out[site] = (int((stats / "tx_bytes").read_text()), int((stats / "rx_bytes").read_text()))
            except OSError:
                out[site] = (0, 0)
        return out

    def command(self, site: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside ``site``'s namespace (``ip netns exec`` execs it: same pid, same
        environment), for programs that are not ``neurofed`` (a peer framework's client)."""
        return ["ip", "netns", "exec", self.netns(site), *argv]

    def spawn(
        self,
        site: str,
        args: Sequence[str],
        log_dir: Path,
        env: dict[str, str] | None = None,
        name: str | None = None,
    ) -> Proc:
        """``neurofed ARGS`` inside ``site``'s namespace (``ip netns exec``), as procs.spawn does
        (``name``: the process and its log, ``site`` by default)."""
        from neurofed.children import ending_with_parent

        log_dir.mkdir(parents=True, exist_ok=True)
        name = name or site
        log = log_dir / f"{name}.log"
        fh = open(log, "ab")  # noqa: SIM115 - the child owns it
        popen = subprocess.Popen(
            self.command(site, [sys.executable, "-m", "neurofed", *args]),
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env or child_env(),
            start_new_session=True,
            preexec_fn=ending_with_parent(),
        )
        fh.close()
        return Proc(name, popen, log)
