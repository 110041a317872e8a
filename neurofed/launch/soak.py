"""The chaos soak: a real federation on one machine with one fault in every round, then proof that
nothing was lost.

    python -m neurofed.launch.soak                      # 5 sites, 20 rounds, a fault-free run first
    python -m neurofed.launch.soak --short              # 5 sites, 6 rounds: every fault kind once

Processes are the kit's own commands (``neurofed coordinator``, ``neurofed edge``, Mosquitto from
the provisioned bundle, an MLflow server); each site runs in its own network namespace where
namespaces can be made (``neurofed.launch.links``), and the coordinator's state lives on a small
tmpfs. Faults (``neurofed.launch.chaos``), one per round from a seeded schedule: a site SIGKILLed
at a random moment and restarted; the coordinator SIGKILLed at one of its ``NEUROFED_FAULT``
points and restarted on its state; the broker SIGKILLed and restarted with or without its
persistence file; a tampered chunk and a replayed update published with a site's own
certificate; a site's link down for longer than the deadline; the state disk full for a while.

At the end it checks, and prints:
- the registry holds exactly one version per round, rounds 1..N (no gap, no duplicate), all of
  one federation run: a restarted coordinator resumed the run it was in, it did not start over;
- every fault is matched by a log line that names it, written by a process that survived it
  (the coordinator, the broker), never by the soak itself;
- every fault landed in the phase it targeted (exit status, times against the round's events);
- every site's audit log reconciles with the coordinator's events (every update taken is one the
  site sent, with the same SHA-256; every site counted in a round had its update taken);
- the final model's test Dice is within ``--dice-tolerance`` of a fault-free run with the same
  seeds (``--no-baseline`` skips that run: the Dice is printed, not compared).

``--self-check`` disables one recovery path (a killed coordinator is restarted on an empty state
folder instead of its own): the soak must then fail, which shows that its checks can.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from neurofed.errors import NeurofedError
from neurofed.launch import chaos
from neurofed.launch.chaos import Fault
from neurofed.launch.local import (
    Broker,
    Proc,
    child_env,
    free_port,
    make_data,
    provision_sites,
    read_events,
    spawn,
)

SHAPE = (32, 32, 32)


class SoakError(NeurofedError):
    """The soak could not go on (a federation stuck past its timeout)."""


@dataclass
class SoakConfig:
    """What the soak runs. The defaults are ``make soak``'s; ``short()`` is the test's."""

    out: Path
    sites: int = 5
    rounds: int = 20
    cases: int = 40  # over all sites
    seed: int = 0
    round_timeout: float = 25.0
    min_sites: int = 3
    hold_full_s: float = 4.0  # how long the state disk stays full once the coordinator said so
    baseline: bool = True
    dice_tolerance: float = 0.05
    self_check: bool = False
    coordinator_args: tuple[str, ...] = ()
    mlflow: str | None = None  # a tracking URI; None: start a private server
    disk_mb: int = 48
    local_epochs: int = 15  # a round of the tiny UNet lasts seconds, so a fault can land inside it

    @classmethod
    def short(cls, out: Path, **kw: Any) -> SoakConfig:
        base = dict(rounds=6, cases=20, round_timeout=15.0, baseline=False, hold_full_s=2.0)
        return cls(out=out, **(base | kw))


@dataclass
class Outcome:
    """What happened to one fault."""

    fault: Fault
    injected: bool = False
    skipped: str = ""  # why it was not injected (e.g. no network namespaces here)
    at: float = 0.0  # when it was injected (unix time)
    landed: str = ""  # the phase evidence, or why it did not land where targeted
    landed_ok: bool = False
    evidence: str = ""  # the surviving process's log line that names it
    survived: bool = False
    lost: int = 0

    def row(self) -> list[str]:
        return [
            str(self.fault.round),
            self.fault.label(),
            "skipped: " + self.skipped if self.skipped else ("yes" if self.injected else "NO"),
            "yes" if self.landed_ok else ("-" if self.skipped else "NO"),
            "yes" if self.survived else ("-" if self.skipped else "NO"),
            str(self.lost),
        ]


@dataclass
class RunResult:
    rounds_registered: list[int] = field(default_factory=list)
    dice: float = float("nan")
    outcomes: list[Outcome] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    audit: dict[str, Any] = field(default_factory=dict)
    run: str = ""  # the federation run the coordinator started (its state's run.json)
    registry_runs: list[str] = field(default_factory=list)  # the run tag of every registered version
    phases: dict[str, float] = field(default_factory=dict)  # seconds spent in each part of the run
    seconds: float = 0.0


@dataclass
class SoakReport:
    config: dict[str, Any]
    chaos: RunResult
    baseline_dice: float | None
    failures: list[str]
    seconds: float
    machine: str
    phases: dict[str, float] = field(default_factory=dict)  # seconds outside the chaos run

    @property
    def ok(self) -> bool:
        return not self.failures

    def table(self) -> str:
        head = ["round", "fault", "injected", "landed", "survived", "data lost"]
        rows = [head] + [o.row() for o in self.chaos.outcomes]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        line = lambda r: " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))  # noqa: E731
        out = [line(head), "-+-".join("-" * w for w in widths), *(line(r) for r in rows[1:])]
        return "\n".join(out)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "seconds": round(self.seconds, 1),
            "machine": self.machine,
            "config": self.config,
            "phases": self.phases,
            "chaos_phases": self.chaos.phases,
            "run": self.chaos.run,
            "registry_runs": self.chaos.registry_runs,
            "rounds_registered": self.chaos.rounds_registered,
            "dice": self.chaos.dice,
            "baseline_dice": self.baseline_dice,
            "audit": self.chaos.audit,
            "faults": [
                {
                    **o.fault.to_dict(),
                    "injected": o.injected,
                    "skipped": o.skipped,
                    "landed": o.landed,
                    "landed_ok": o.landed_ok,
                    "evidence": o.evidence,
                    "survived": o.survived,
                    "lost": o.lost,
                }
                for o in self.chaos.outcomes
            ],
            "failures": self.failures,
        }


# -- log reading -----------------------------------------------------------------------------------
_TS = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")


def log_lines(path: Path, since: float = 0.0) -> list[tuple[float, str]]:
    """(unix time, line) of a ``neurofed`` log (``asctime`` stamps) or a Mosquitto log (epoch
    stamps), at or after ``since`` (lines without a stamp take the last one seen)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    out, t = [], 0.0
    for line in text.splitlines():
        m = _TS.match(line)
        if m:
            t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp() + int(m.group(2)) / 1000
        else:
            head = line.split(":", 1)[0]
            if head.isdigit() and len(head) >= 9:
                t = float(head)
        if t >= since - 1.0:  # asctime has ms; Mosquitto whole seconds
            out.append((t, line))
    return out


def find_line(paths: Sequence[Path], pattern: str, since: float = 0.0) -> str:
    """The first line matching ``pattern`` in ``paths`` at or after ``since``, with its file."""
    rx = re.compile(pattern)
    for p in paths:
        for _, line in log_lines(p, since):
            if rx.search(line):
                return f"{p.name}: {line.strip()}"
    return ""


# -- one federation --------------------------------------------------------------------------------
class Federation:
    """One federation's processes under a fault schedule (empty: the fault-free run). ``init``
    gives the initial weights' file, waiting for it if it is still being written."""

    def __init__(
        self,
        cfg: SoakConfig,
        root: Path,
        data: Path,
        init: Callable[[], Path],
        spacing: float,
        name: str,
        plan: list[Fault],
    ) -> None:
        self.cfg, self.root, self.data, self.init, self.spacing = cfg, root, data, init, spacing
        self.name, self.plan = name, plan
        self.outcomes = [Outcome(f) for f in plan]
        self.failures: list[str] = []
        self.sites = sorted(p.name for p in data.iterdir() if p.is_dir())
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.links = None
        self.no_links = ""
        self.disk = root / "coordinator-disk"
        self.no_disk = ""
        self.coord: Proc | None = None
        self.coord_fault: Outcome | None = None
        self.coord_n = 0
        self.edges: dict[str, Proc] = {}
        self.edge_n: dict[str, int] = {}
        self.killing: set[str] = set()
        self.over = False
        self.run_id = ""
        self.registry_runs: list[str] = []

    # paths
    @property
    def state(self) -> Path:
        return self.disk / "state"

    def site_state(self, site: str) -> Path:
        return self.root / f"{site}-state"

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        return [e for e in read_events(self.state) if kind is None or e.get("event") == kind]

    def coordinator_logs(self) -> list[Path]:
        return sorted(self.logs.glob("coordinator-*.log"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))

    # setup
    def open(self) -> None:
        from neurofed.launch import links

        host = "localhost"
        why = links.unavailable()
        if why is None:
            self.links = links.ShapedLinks(self.sites, None, None).open()
            host = self.links.broker_host
        else:
            self.no_links = why
        self.no_disk = chaos.mount_tmpfs(self.disk, self.cfg.disk_mb) or ""
        self.port = free_port()
        self.host = host
        self.bundles = provision_sites(self.root / "bundles", self.name, self.sites, self.port, host=host)
        self.broker = Broker(self.bundles, self.port, self.logs / "mosquitto.log")
        self.broker.start()
        for site in self.sites:
            self.start_site(site)

    def close(self) -> None:
        procs = [*self.edges.values(), *([self.coord] if self.coord is not None else [])]
        for p in procs:  # all at once: each may take seconds to leave
            if p.alive():
                p.popen.terminate()
        for p in procs:  # past the end the coordinator ignores SIGTERM while the registry catches up
            p.stop(timeout=10)
        self.broker.stop()
        if self.links is not None:
            self.links.close()
        if not self.no_disk:  # keep the coordinator's record for a post-mortem
            for name in ("events.jsonl", "run.json", "registered.json"):
                if (self.state / name).is_file():
                    shutil.copy2(self.state / name, self.root / f"coordinator-{name}")
            chaos.unmount(self.disk)

    def start_site(self, site: str) -> Proc:
        n = self.edge_n[site] = self.edge_n.get(site, 0) + 1
        args = [
            "-v", "edge",
            "--bundle", str(self.bundles / site),
            "--data", str(self.data / site),
            "--state", str(self.site_state(site)),
            "--resend-after", "6",
            "--seed", str(self.cfg.seed),
        ]  # fmt: skip
        name = f"{site}-{n}"
        if self.links is not None:
            p = self.links.spawn(site, args, self.logs, child_env(), name=name)
        else:
            p = spawn(name, args, self.logs, child_env())
        self.edges[site] = p
        return p

    def start_coordinator(self) -> Proc:
        self.coord_n += 1
        env: dict[str, str] = {}
        self.coord_fault = next(
            (
                o
                for o in self.outcomes
                if o.fault.kind == "coordinator-kill" and not o.injected and not o.skipped
            ),
            None,
        )
        if self.coord_fault is not None:
            env = {
                "NEUROFED_FAULT": self.coord_fault.fault.point,
                "NEUROFED_FAULT_ROUND": str(self.coord_fault.fault.round),
            }
        args = [
            "-v", "coordinator",
            "--bundle", str(self.bundles / "coordinator"),
            "--rounds", str(self.cfg.rounds),
            "--min-sites", str(self.cfg.min_sites),
            "--round-timeout", str(self.cfg.round_timeout),
            "--state", str(self.state),
            "--model-size", "tiny",
            "--patch-size", str(SHAPE[0]),
            "--spacing", str(self.spacing),
            "--init-weights", str(self.init()),
            "--linger", "5",
            "--local-epochs", str(self.cfg.local_epochs),
            *(["--mlflow", self.mlflow] if self.mlflow else []),
            *self.cfg.coordinator_args,
        ]  # fmt: skip
        self.coord = spawn(f"coordinator-{self.coord_n}", args, self.logs, child_env(**env))
        return self.coord

    # supervision: restart what died, attribute each death to its fault or call it a failure
    def supervise(self) -> None:
        c = self.coord
        if c is not None and not c.alive():
            rc = c.popen.returncode
            o = self.coord_fault
            if o is not None and rc == -signal.SIGKILL and f"SIGKILL at {o.fault.point}" in c.tail(5):
                o.injected, o.at = True, time.time()
                line = find_line([c.log], rf"fault injection: SIGKILL at {o.fault.point} \(round (\d+)\)")
                got = re.search(r"\(round (\d+)\)", line)
                o.landed_ok = bool(got) and int(got.group(1)) == o.fault.round
                o.landed = f"exit {rc}; {line or 'no fault line'}"
                if self.cfg.self_check:  # the recovery path disabled: the state is lost
                    lost = self.disk / f"lost-{self.coord_n}"
                    self.state.rename(lost)
                self.start_coordinator()
            elif rc == 0 and self.over:
                pass
            else:
                self.failures.append(f"{c.name} exited with {rc} outside any fault:\n{c.tail(30)}")
                if not self.over:
                    self.start_coordinator()
        if not self.over:
            for site, p in list(self.edges.items()):
                if not p.alive() and site not in self.killing:
                    self.failures.append(f"{p.name} exited with {p.popen.returncode} outside any fault")
                    self.start_site(site)

    def wait(self, pred: Callable[[], Any], timeout: float, what: str) -> Any:
        end = time.time() + timeout
        while time.time() < end:
            self.supervise()
            v = pred()
            if v:
                return v
            time.sleep(0.2)
        tails = "\n".join(f"--- {p.name} ---\n{p.tail(15)}" for p in [self.coord, *self.edges.values()] if p)
        raise SoakError(f"{self.name}: timed out after {timeout:.0f} s waiting for {what}\n{tails}")

    def announced(self, r: int) -> dict | None:
        return next((e for e in reversed(self.events("announce")) if e.get("round") == r), None)

    def closed(self, r: int) -> dict | None:
        return next((e for e in reversed(self.events("round")) if e.get("round") == r), None)

    # the run
    def run(self, mlflow: str | None) -> RunResult:
        t0 = time.time()
        self.mlflow = mlflow
        budget = 3 * self.cfg.round_timeout + 240
        phases: dict[str, float] = {}
        mark = [t0]

        def lap(name: str) -> None:
            now = time.time()
            phases[name] = round(now - mark[0], 1)
            mark[0] = now

        self.open()
        try:
            self.wait(
                lambda: all((self.site_state(s) / "status.json").is_file() for s in self.sites),
                300,
                "the edge agents to start",
            )
            lap("broker and sites up")
            self.start_coordinator()
            self.wait(lambda: self.announced(1), budget, "round 1's announcement")
            self.run_id = json.loads((self.state / "run.json").read_text())["run"]
            lap("coordinator up")
            for o in self.outcomes or [None]:
                if o is None:
                    break
                r = o.fault.round
                ann = self.wait(lambda r=r: self.announced(r), budget, f"round {r}'s announcement")
                self.inject(o, ann)
            self.wait(
                lambda: self.closed(self.cfg.rounds), budget * max(1, self.cfg.rounds), "the last round"
            )
            lap("rounds")
            self.over = True
            code = self.wait(
                lambda: self.coord is not None and not self.coord.alive() and (self.coord.popen.returncode,),
                300,
                "the coordinator to finish",
            )[0]
            if code != 0:
                self.failures.append(f"the coordinator ended with {code}:\n{self.coord.tail(30)}")
            lap("registry catch-up and exit")
            result = RunResult(outcomes=self.outcomes, failures=self.failures, run=self.run_id)
            result.rounds_registered = self.registered_rounds()
            result.registry_runs = self.registry_runs
            self.check_run()
            for o in self.outcomes:
                self.judge(o)
            result.audit = self.reconcile()
            result.dice = self.test_dice()
            lap("checks")
        finally:
            self.close()
        lap("shutdown")
        result.phases = phases
        result.seconds = time.time() - t0
        return result

    # faults
    def inject(self, o: Outcome, ann: dict) -> None:
        f = o.fault
        kind = f.kind
        if kind == "net-cut" and self.no_links:
            o.skipped = self.no_links
        if kind == "disk-full" and self.no_disk:
            o.skipped = self.no_disk
        if kind == "tamper-replay" and "--secure-aggregation" in self.cfg.coordinator_args:
            # a secure round's site keeps no plain update to seal again, only its masked input
            o.skipped = "secure aggregation: the injector cannot forge masked inputs yet"
        if o.skipped:
            return
        if kind == "coordinator-kill":
            self.wait(
                lambda: o.injected, 3 * self.cfg.round_timeout + 240, f"the coordinator's {f.point} kill"
            )
            return
        # a cut right at the announcement: the site cannot have uploaded yet; a full disk likewise,
        # before the round's save (a quick round closes and saves within a second or two)
        if kind in ("net-cut", "disk-full"):
            time.sleep(min(f.delay, 0.2))
        elif kind in ("site-kill", "broker-kill"):
            # a moment while the sites train: a tiny model's round closes about a second after its
            # announcement, so the schedule's delay is held to the first half second
            time.sleep(min(f.delay, 0.5))
        else:
            time.sleep(f.delay)
        {
            "site-kill": self._site_kill,
            "broker-kill": self._broker_kill,
            "tamper-replay": self._tamper_replay,
            "net-cut": self._net_cut,
            "disk-full": self._disk_full,
        }[kind](o, ann)

    def _site_kill(self, o: Outcome, ann: dict) -> None:
        f, r = o.fault, o.fault.round
        p = self.edges[f.site]
        self.killing.add(f.site)
        closed = self.closed(r)  # read before the kill: a site lost mid-round may close it at once
        o.at = time.time()
        p.popen.send_signal(signal.SIGKILL)
        rc = p.popen.wait(10)
        o.injected = True
        o.landed_ok = rc == -signal.SIGKILL and closed is None
        o.landed = f"exit {rc}, {o.at - ann['t']:.1f} s after round {r}'s announcement" + (
            "" if closed is None else ", after the round closed"
        )
        self.start_site(f.site)
        self.killing.discard(f.site)

    def _broker_kill(self, o: Outcome, ann: dict) -> None:
        f, r = o.fault, o.fault.round
        proc = self.broker.proc
        db = self.bundles / "broker" / "data" / "mosquitto.db"
        saved = db.stat().st_size if db.is_file() else 0
        closed = self.closed(r)  # before the kill, as for a site
        o.at = time.time()
        proc.send_signal(signal.SIGKILL)
        rc = proc.wait(10)
        self.broker.proc = None
        if f.variant == "wipe":
            db.unlink(missing_ok=True)
        self.broker.start()
        o.injected = True
        o.landed_ok = rc == -signal.SIGKILL and closed is None
        o.landed = (
            f"exit {rc}, {o.at - ann['t']:.1f} s into round {r}; saved state {saved} bytes, "
            + ("removed" if f.variant == "wipe" else "kept")
            + ("" if closed is None else "; after the round closed")
        )

    def _tamper_replay(self, o: Outcome, ann: dict) -> None:
        """Once the coordinator took a round-``r`` update (the drawn site's, or another's when the
        drawn site is not sending this round: just restarted, cut off), that site's certificate
        publishes the tampered and the replayed copies of it. The update is read from the site's
        state as soon as the site wrote it: the site deletes it when the round closes, which can
        be a moment after the coordinator took it."""
        f, r = o.fault, o.fault.round
        held: dict[str, tuple[dict[str, Any], bytes]] = {}

        def taken() -> list[str]:
            return [e["site"] for e in self.events("update") if e["round"] == r]

        def poll() -> bool:
            for site in self.sites:
                if site not in held and (got := chaos.site_update(self.site_state(site), r)) is not None:
                    held[site] = got
            done = set(taken()) & set(held)
            return (
                bool(self.closed(r)) or f.site in done or (bool(done) and len(taken()) >= self.cfg.min_sites)
            )

        self.wait(poll, 3 * self.cfg.round_timeout + 120, f"round {r}'s updates")
        if f.site not in set(taken()) & set(held):
            f.site = next((s for s in taken() if s in held), f.site)
        got = held.get(f.site)
        if got is None:
            o.landed = f"{f.site}'s round-{r} update was not in its state"
            return
        run = json.loads((self.state / "run.json").read_text())["run"]
        o.at = time.time()
        sent = chaos.tamper_and_replay(self.bundles / f.site, self.host, self.port, run, r, *got)
        o.injected = True
        o.landed = f"{sent['frames']} frames taken by the broker: {sent['taken_by_broker']}"

    def _net_cut(self, o: Outcome, ann: dict) -> None:
        f, r = o.fault, o.fault.round
        veth = self.links.host_veth(f.site)
        chaos.set_link(veth, up=False)
        o.at = time.time()
        o.injected = True
        try:
            self.wait(
                lambda: self.closed(r) and time.time() - o.at > self.cfg.round_timeout + 2,
                3 * self.cfg.round_timeout + 120,
                f"round {r} to close with {f.site} cut off",
            )
        finally:
            chaos.set_link(veth, up=True)
        up = time.time()
        closed = self.closed(r) or {}
        o.landed_ok = o.at <= ann["deadline"] <= up and f.site not in closed.get("sites", [])
        o.landed = (
            f"link down {o.at - ann['t']:.1f} s after the announcement for {up - o.at:.0f} s "
            f"(deadline {ann['deadline'] - ann['t']:.0f} s); round {r} closed with {closed.get('sites')}"
        )

    def _disk_full(self, o: Outcome, ann: dict) -> None:
        r = o.fault.round
        filler = chaos.fill_disk(self.disk)
        o.at = time.time()
        o.injected = True
        try:
            line = self.wait(
                lambda: find_line(self.coordinator_logs(), r"state disk full: cannot save round \d+", o.at),
                3 * self.cfg.round_timeout + 120,
                "the coordinator to report the full disk",
            )
            time.sleep(self.cfg.hold_full_s)
        finally:
            filler.unlink(missing_ok=True)
        freed = time.time()
        nxt = self.wait(
            lambda: self.announced(r + 1) or (r >= self.cfg.rounds and self.closed(r)),
            3 * self.cfg.round_timeout + 120,
            f"round {r + 1}",
        )
        # the round's own save met the full disk (the first line may be another write's, e.g. an
        # earlier round's registry ledger; the round's save then says so when it finally succeeds)
        own = find_line(
            self.coordinator_logs(),
            rf"cannot save round {r} in |round {r} saved after \d+ s of a full disk",
            o.at,
        )
        o.landed_ok = nxt.get("t", freed) >= freed and bool(own)
        o.landed = f"disk full at {o.at - ann['t']:.1f} s into round {r} for {freed - o.at:.0f} s; {line}"

    def judge(self, o: Outcome) -> None:
        """The surviving process's line that names the fault, and whether its round survived."""
        if o.skipped:
            return
        f, r = o.fault, o.fault.round
        coords = self.coordinator_logs()
        broker = [self.logs / "mosquitto.log"]
        since = o.at
        if f.kind == "site-kill":
            o.evidence = find_line(
                broker, rf"Client {re.escape(f.site)} (closed its connection|disconnected)", since
            )
        elif f.kind == "coordinator-kill":
            o.evidence = find_line(coords[1:], r"resuming after round \d+", since)
        elif f.kind == "broker-kill":
            pattern = (
                rf"round {r}: .*(publish|announc)|reannounc|connected to .*session present"
                if f.variant == "wipe"
                else r"connected to .*session present"
            )
            o.evidence = find_line(coords, pattern, since)
        elif f.kind == "tamper-replay":
            rej = [
                e
                for e in self.events("reject")
                if e.get("site") == f.site
                and e.get("t", 0) >= since - 1
                and e.get("msg_round", e.get("round")) == r
            ]
            reasons = sorted({e.get("reason") for e in rej})
            line = find_line(
                coords, rf"rejected .* from {re.escape(f.site)} .*(tampered-chunk|duplicate|late)", since
            )
            o.evidence = line or (f"events.jsonl: reject {reasons}" if rej else "")
            o.landed_ok = "tampered-chunk" in reasons and any(x in reasons for x in ("duplicate", "late"))
            o.landed += f"; rejected as {reasons}"
        elif f.kind == "net-cut":
            o.evidence = find_line(
                coords, rf"round {r}: deadline passed.*without .*{re.escape(f.site)}", since
            )
        elif f.kind == "disk-full":
            o.evidence = find_line(coords, rf"state disk has space again: round {r} saved", since)
        counted = [int(x) for x in self.rounds_tags]
        o.survived = o.injected and counted.count(r) == 1
        o.lost = 0 if counted.count(r) == 1 else 1

    # checks
    def registered_rounds(self) -> list[int]:
        """Round tags of every version of the federation's model in the registry (all runs)."""
        self.rounds_tags: list[int] = []
        if not self.mlflow:
            return []
        import mlflow

        from neurofed.mlflow_server.names import TAG_ROUND, TAG_RUN
        from neurofed.mlflow_server.registry import model_name

        client = mlflow.MlflowClient(tracking_uri=self.mlflow, registry_uri=self.mlflow)
        versions = client.search_model_versions(f"name = '{model_name(self.name)}'")
        self.rounds_tags = sorted(int(v.tags.get(TAG_ROUND, -1)) for v in versions)
        self.registry_runs = sorted({v.tags.get(TAG_RUN, "") for v in versions})
        return self.rounds_tags

    def check_run(self) -> None:
        """One federation run from start to end: a restarted coordinator resumes the run it was
        in, it never starts over (which would train the first rounds again and register them as
        another run's versions)."""
        try:
            now = json.loads((self.state / "run.json").read_text())["run"]
        except (OSError, ValueError, KeyError):
            now = ""
        if now != self.run_id:
            self.failures.append(
                f"the coordinator's state holds run {now or '(none)'}, not {self.run_id}: "
                "a restarted coordinator started the federation over instead of resuming it"
            )
        other = [r for r in self.registry_runs if r != self.run_id]
        if self.mlflow and other:
            self.failures.append(
                f"the registry holds versions of run(s) {', '.join(other) or '(untagged)'}, "
                f"not only of the federation's run {self.run_id}"
            )

    def reconcile(self) -> dict[str, Any]:
        """Every update the coordinator took is one its site sent (same round and SHA-256), and
        every site counted in a round had its update taken."""
        taken = self.events("update")
        problems: list[str] = []
        sent_total = 0
        for site in self.sites:
            path = self.site_state(site) / "audit.jsonl"
            audit = (
                [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
            )
            sent = {(e["round"], e["sha256"]) for e in audit if e["kind"] == "update"}
            sent_total += len(sent)
            for e in taken:
                if e["site"] == site and (e["round"], e["sha256"]) not in sent:
                    problems.append(
                        f"{site} round {e['round']}: the coordinator took {e['sha256'][:12]}, not in its audit"
                    )
        took = {(e["site"], e["round"]) for e in taken}
        last: dict[int, dict] = {}
        for e in self.events("round"):
            if e.get("train"):
                last[int(e["round"])] = e
        for r, e in sorted(last.items()):
            for site in e.get("sites", []):
                if (site, r) not in took:
                    problems.append(f"round {r} counted {site} without an update event")
        return {"updates_taken": len(taken), "updates_sent": sent_total, "problems": problems}

    def test_dice(self) -> float:
        """Test Dice of the last round's model over every site's test cases."""
        import torch

        from neurofed.coordinator.state import StateStore
        from neurofed.edge_node.centralized import resolve_cases
        from neurofed.edge_node.splits import select
        from neurofed.edge_node.training import CaseTrainer, TrainConfig
        from neurofed.models.checkpoint import load_weights

        torch.set_num_threads(1)
        path = StateStore(self.state).round_weights_path(self.cfg.rounds)
        if not path.is_file():
            self.failures.append(f"no model for round {self.cfg.rounds} in {path.parent}")
            return float("nan")
        state, config, _ = load_weights(path)
        cases, splits, _ = resolve_cases(self.data, split_seed=self.cfg.seed)
        trainer = CaseTrainer({"test": select(cases, splits, "test")}, config, TrainConfig(), "cpu")
        model = trainer.model()
        model.load_state_dict(state)
        return float(trainer.evaluate_module(model, "test", hd95=False).dice)


# -- the soak --------------------------------------------------------------------------------------
def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}, load {os.getloadavg()[0]:.1f}"


def verdict(cfg: SoakConfig, result: RunResult, baseline: float | None) -> list[str]:
    """Every way the chaos run fell short of "nothing lost", one line each (empty: it passed)."""
    failures = list(result.failures)
    want = list(range(1, cfg.rounds + 1))
    if result.rounds_registered != want:
        failures.append(f"registered rounds {result.rounds_registered}, expected exactly {want}")
    for o in result.outcomes:
        if o.skipped:
            continue
        if not o.injected:
            failures.append(f"round {o.fault.round}: {o.fault.label()} was not injected ({o.landed})")
        elif not o.landed_ok:
            failures.append(f"round {o.fault.round}: {o.fault.label()} did not land as targeted: {o.landed}")
        if o.injected and not o.evidence:
            failures.append(f"round {o.fault.round}: no surviving process logged {o.fault.label()}")
        if o.injected and not o.survived:
            failures.append(f"round {o.fault.round}: {o.fault.label()}: round not registered exactly once")
    failures += [f"audit: {p}" for p in result.audit.get("problems", [])]
    if baseline is not None and not abs(result.dice - baseline) <= cfg.dice_tolerance:
        failures.append(
            f"test Dice {result.dice:.4f} vs fault-free {baseline:.4f}: beyond {cfg.dice_tolerance}"
        )
    if result.dice != result.dice:
        failures.append("the final model's test Dice could not be measured")
    return failures


def prepare(cfg: SoakConfig) -> tuple[Path, tuple[float, ...], list[Fault]]:
    """The sites' synthetic cases and the schedule: (data folder, voxel spacing, faults)."""
    data = cfg.out / "data"
    summary = make_data(data, sites=cfg.sites, cases=cfg.cases, shape=SHAPE, seed=cfg.seed)
    secure = "--secure-aggregation" in cfg.coordinator_args
    plan = chaos.schedule(cfg.rounds, sorted(summary["sites"]), cfg.seed, secure=secure)
    return data, tuple(float(x) for x in summary["spacing"]), plan


def initial_model(cfg: SoakConfig, spacing: tuple[float, ...]) -> Path:
    """The seeded initial weights both runs start from, built as ``neurofed.coordinator.init_weights``
    builds them (seed, then the UNet). Built here rather than in that module's child process: the
    soak imports torch and MONAI anyway for the final Dice, and a second import costs tens of
    seconds on a loaded machine; it runs while the broker and the sites start."""
    import torch

    from neurofed.coordinator.state import StateStore
    from neurofed.models.config import ModelConfig
    from neurofed.models.unet import build_unet

    mcfg = ModelConfig.tiny(patch_size=SHAPE, spacing=spacing)
    torch.manual_seed(int(cfg.seed))
    weights = {k: v.detach().cpu().numpy() for k, v in build_unet(mcfg).state_dict().items()}
    store = StateStore(cfg.out / "init")
    store.write_round_weights(0, weights, mcfg.to_dict())
    # what the final checks use (MLflow's client, the trainer that scores the test Dice), imported
    # while the federation runs rather than at the end
    import mlflow  # noqa: F401

    import neurofed.edge_node.centralized  # noqa: F401
    import neurofed.edge_node.training  # noqa: F401

    return store.round_weights_path(0)


def run_soak(cfg: SoakConfig, say: Callable[[str], None] = print) -> SoakReport:
    """Prepare data and a registry, run the fault-free federation (unless ``--no-baseline``) and
    the chaotic one, check everything and return the report."""
    t0 = time.time()
    phases: dict[str, float] = {}
    cfg.out.mkdir(parents=True, exist_ok=True)
    data, spacings, plan = prepare(cfg)
    spacing = spacings[0]
    out = cfg.out
    say("schedule: " + ", ".join(f"r{f.round} {f.label()}" for f in plan))
    phases["data"] = round(time.time() - t0, 1)
    pool = ThreadPoolExecutor(1, thread_name_prefix="soak-prep")
    init = pool.submit(initial_model, cfg, spacings).result
    pool.shutdown(wait=False)

    server = None
    uri = cfg.mlflow
    if uri is None:
        from neurofed.mlflow_server.server import MlflowServer

        t1 = time.time()
        server = MlflowServer(port=free_port(), state_dir=out / "mlflow", startup_timeout=300).start()
        uri = server.url
        phases["MLflow server"] = round(time.time() - t1, 1)
    try:
        baseline = None
        if cfg.baseline:
            say("fault-free run with the same seeds ...")
            base = Federation(cfg, out / "baseline", data, init, spacing, "soakbase", []).run(uri)
            baseline = base.dice
            phases["fault-free run"] = round(base.seconds, 1)
            say(f"fault-free: test Dice {baseline:.4f} in {base.seconds:.0f} s")
        say("chaos run ...")
        fed_name = f"soak{int(time.time()) % 100000}"
        result = Federation(cfg, out / "chaos", data, init, spacing, fed_name, plan).run(uri)
    finally:
        if server is not None:
            server.stop()
    failures = verdict(cfg, result, baseline)
    conf = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.__dict__.items() if k not in ("mlflow",)
    }
    return SoakReport(conf, result, baseline, failures, time.time() - t0, machine(), phases)


def print_report(rep: SoakReport, say: Callable[[str], None] = print) -> None:
    say(rep.table())
    for o in rep.chaos.outcomes:
        say(f"r{o.fault.round} {o.fault.label()}: {o.skipped or o.landed}")
        if o.evidence:
            say(f"    logged by a survivor: {o.evidence[:220]}")
    a = rep.chaos.audit
    say(
        f"registry rounds: {rep.chaos.rounds_registered}; audit: {a.get('updates_taken')} updates taken, "
        f"{a.get('updates_sent')} sent, {len(a.get('problems', []))} problems"
    )
    spent = {**rep.phases, **{f"chaos run: {k}": v for k, v in rep.chaos.phases.items()}}
    say("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in spent.items()))
    base = "not run" if rep.baseline_dice is None else f"{rep.baseline_dice:.4f}"
    say(f"test Dice {rep.chaos.dice:.4f} (fault-free {base}); {rep.seconds:.0f} s on {rep.machine}")
    say("SOAK PASSED" if rep.ok else "SOAK FAILED:\n- " + "\n- ".join(rep.failures))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m neurofed.launch.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="working folder (default: a fresh temporary one, removed on success)")
    p.add_argument("--short", action="store_true", help="6 rounds, every fault kind once, no fault-free run")
    p.add_argument("--rounds", type=int)
    p.add_argument("--sites", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--round-timeout", type=float)
    p.add_argument("--no-baseline", action="store_true", help="skip the fault-free run (no Dice comparison)")
    p.add_argument("--self-check", action="store_true", help="disable the coordinator's resume: must fail")
    p.add_argument("--secure-aggregation", action="store_true")
    p.add_argument("--compression", choices=("none", "fp16", "int8", "int8-topk"))
    p.add_argument(
        "--dp-target-epsilon",
        type=float,
        help="sample-level DP-SGD at every site, this epsilon over the rounds (neurofed coordinator "
        "--dp-target-epsilon)",
    )
    p.add_argument("--json", help="also write the report as JSON here")
    a = p.parse_args(argv)
    out = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="neurofed-soak-"))
    extra: list[str] = []
    if a.secure_aggregation:
        extra.append("--secure-aggregation")
    if a.compression:
        extra += ["--compression", a.compression]
    if a.dp_target_epsilon:
        extra += ["--dp-target-epsilon", str(a.dp_target_epsilon)]
    kw: dict[str, Any] = {
        "sites": a.sites,
        "seed": a.seed,
        "self_check": a.self_check,
        "coordinator_args": tuple(extra),
    }
    if a.rounds:
        kw["rounds"] = a.rounds
    if a.round_timeout:
        kw["round_timeout"] = a.round_timeout
    if a.no_baseline:
        kw["baseline"] = False
    cfg = SoakConfig.short(out, **kw) if a.short else SoakConfig(out=out, **kw)
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    say = lambda s: print(s, flush=True)  # noqa: E731
    say(
        f"soak in {out}: {cfg.sites} sites, {cfg.rounds} rounds" + (" (self-check)" if cfg.self_check else "")
    )
    from neurofed.stopping import exit_on_sigterm

    exit_on_sigterm()  # a SIGTERM unwinds: namespaces, the tmpfs and the processes are removed
    rep = run_soak(cfg, say)
    print_report(rep, say)
    if a.json:
        Path(a.json).write_text(json.dumps(rep.to_dict(), indent=1, default=str))
    if rep.ok and not a.out:
        shutil.rmtree(out, ignore_errors=True)
    return 0 if rep.ok else 1


if __name__ == "__main__":
    sys.exit(main())
