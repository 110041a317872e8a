"""Failures with real processes and a real broker: `neurofed coordinator` and `neurofed edge`
processes (one torch thread each), a private Mosquitto from a fresh provisioning, real synthetic
NIfTI data (shared by the module), the tiny UNet on 32^3 volumes so rounds take seconds.

- a site SIGKILLed mid-upload: the round completes with the others at the deadline (quorum),
  the site rejoins the next round; a late update and one for an old round are rejected;
  the audit log matches what the coordinator received;
- the coordinator SIGKILLed at each injection point: restarted, it resumes; no round is lost and
  none is registered twice (checked in the real MLflow registry);
- the coordinator SIGKILLed once the evaluation-only round is announced: its successor closes
  that round with every site's metrics;
- the broker SIGKILLed during the uploads and restarted: everyone reconnects, the round completes;
- the broker restarted without its saved state (no retained task or model): the coordinator
  publishes the round again, and a site that had not got it yet takes part;
- the same after the federation's end: the lingering coordinator publishes the end again, and
  SIGTERMs during its final registry wait are ignored;
- a site revoked live (no broker restart): its connection closes at once, its certificate is
  refused, nobody else is disconnected, the round closes with the rest; a site added live
  takes part from the next round.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import pytest

from neurofed.coordinator.state import StateStore
from neurofed.launch.local import (
    Broker,
    Proc,
    child_env,
    free_port,
    make_data,
    provision_sites,
    read_events,
    spawn,
    wait_for,
)
from tests.fixtures.broker import connection_ends
from tests.fixtures.mlflow import mlflow_server, mlflow_server_handle  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow

SHAPE = (32, 32, 32)
ROUNDS_FOR_SIGTERM = 20


def federation_data(tmp_path_factory, name: str, *, sites: int, cases: int):
    """Synthetic sites at 32^3 and one initial tiny model for every coordinator of a module
    (building it in each coordinator costs 10-30 s here)."""
    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        pytest.skip("Mosquitto is not installed (apt-get install mosquitto)")
    from neurofed.coordinator.init_weights import initial_weights
    from neurofed.models.config import ModelConfig

    root = tmp_path_factory.mktemp(name)
    summary = make_data(root, sites=sites, cases=cases, shape=SHAPE)
    cfg = ModelConfig.tiny(patch_size=SHAPE, spacing=tuple(summary["spacing"])).to_dict()
    StateStore(root / "init").write_round_weights(0, initial_weights(cfg), cfg)
    summary["init"] = str(StateStore(root / "init").round_weights_path(0))
    return root, summary


@pytest.fixture(scope="module")
def fed_data(tmp_path_factory):
    return federation_data(tmp_path_factory, "fed-data", sites=3, cases=12)


class Fed:
    """One federation's processes for a test; everything is killed at the end."""

    def __init__(self, tmp: Path, data, *, federation: str = "testfed", kem: str = "x25519") -> None:
        self.tmp = tmp
        self.data_root, self.summary = data
        self.sites = sorted(self.summary["sites"])
        self.port = free_port()
        self.bundles = provision_sites(tmp / "bundles", federation, self.sites, self.port, kem=kem)
        self.federation = federation
        self.logs = tmp / "logs"
        self.logs.mkdir()
        self.state = tmp / "coordinator-state"
        self.broker = Broker(self.bundles, self.port, self.logs / "mosquitto.log")
        self.broker.start()
        self.procs: list[Proc] = []
        self.coord: Proc | None = None
        self.edges: dict[str, Proc] = {}
        self._n = 0

    def start_coordinator(
        self,
        *,
        rounds: int,
        min_sites: int,
        timeout: float,
        mlflow: str | None = None,
        fault: str | None = None,
        fault_round: int | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> Proc:
        args = [
            "-v",
            "coordinator",
            "--bundle",
            str(self.bundles / "coordinator"),
            "--rounds",
            str(rounds),
            "--min-sites",
            str(min_sites),
            "--round-timeout",
            str(timeout),
            "--state",
            str(self.state),
            "--model-size",
            "tiny",
            "--patch-size",
            str(SHAPE[0]),
            "--spacing",
            str(self.summary["spacing"][0]),
            "--init-weights",
            self.summary["init"],
        ]
        if mlflow:
            args += ["--mlflow", mlflow]
        args += list(extra_args)
        extra = {}
        if fault:
            extra["NEUROFED_FAULT"] = fault
            if fault_round is not None:
                extra["NEUROFED_FAULT_ROUND"] = str(fault_round)
        self._n += 1
        self.coord = spawn(f"coordinator-{self._n}", args, self.logs, child_env(**extra))
        self.procs.append(self.coord)
        return self.coord

    def start_site(self, site: str, data: str | None = None, **env: str) -> Proc:
        args = [
            "-v",
            "edge",
            "--bundle",
            str(self.bundles / site),
            "--data",
            str(self.data_root / (data or site)),
            "--state",
            str(self.tmp / f"{site}-state"),
            "--resend-after",
            "6",
        ]
        if data:
            args.append("--data-site-mismatch-ok")
        self._n += 1
        p = spawn(f"{site}-{self._n}", args, self.logs, child_env(**env))
        self.edges[site] = p
        self.procs.append(p)
        return p

    def start_sites_one_dying_mid_upload(self) -> tuple[str, str, str, Proc]:
        """Sites a and b, and c set to SIGKILL itself mid-upload in round 1 (its update stored,
        not acknowledged); all three ready."""
        a, b, c = self.sites
        self.start_site(a)
        self.start_site(b)
        victim = self.start_site(c, NEUROFED_FAULT="site-mid-upload", NEUROFED_FAULT_ROUND="1")
        self.wait_sites_ready()
        return a, b, c, victim

    def wait_sites_ready(self, sites=None, timeout: float = 180) -> None:
        """Edge processes take 10-30 s to import torch and MONAI here: start rounds after that."""

        def ready() -> bool:
            for s in sites or self.sites:
                f = self.tmp / f"{s}-state" / "status.json"
                if not f.is_file():
                    return False
            return True

        wait_for(ready, timeout, "the edge agents to start", self.procs)

    def events(self, kind: str | None = None) -> list[dict]:
        ev = read_events(self.state)
        return [e for e in ev if kind is None or e["event"] == kind]

    def round_closed(self, r: int) -> dict | None:
        return next((e for e in self.events("round") if e["round"] == r), None)

    def wait_round(self, r: int, timeout: float = 240) -> dict:
        return wait_for(lambda: self.round_closed(r), timeout, f"round {r} to close", self.procs)

    def audit(self, site: str) -> list[dict]:
        path = self.tmp / f"{site}-state" / "audit.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []

    def close(self) -> None:
        for p in self.procs:
            p.kill()
        self.broker.kill()


@pytest.fixture
def fed(request, tmp_path, fed_data):
    f = Fed(tmp_path, fed_data)
    yield f
    f.close()
    print_logs_if_failed(request, f)


def print_logs_if_failed(request, f: Fed, lines: int = 60) -> None:
    """A failure happens in one of several processes: CI shows only what the test printed."""
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for log in sorted(f.logs.glob("*.log")):
            print(f"----- {log.name} (last {lines} lines) -----")
            print("\n".join(log.read_text(errors="replace").splitlines()[-lines:]))


def test_site_killed_mid_upload_others_finish_the_round_and_it_rejoins(fed):
    a, b, c, victim = fed.start_sites_one_dying_mid_upload()
    fed.start_coordinator(rounds=2, min_sites=2, timeout=90)
    # Rounds of the tiny model take a second, a restarted site twenty: hold the other two still
    # (SIGSTOP) once their round-1 updates are in, so that round 2 is still open when it is back.
    wait_for(
        lambda: {e["site"] for e in fed.events("update") if e["round"] == 1} >= {a, b},
        240,
        "round-1 updates from the two healthy sites",
        fed.procs,
        poll=0.05,
    )
    for s in (a, b):
        fed.edges[s].popen.send_signal(signal.SIGSTOP)
    r1 = fed.wait_round(1)
    assert r1["sites"] == [a, b], "the round closes with the two that reported (min-sites 2)"
    assert victim.wait(30) == -9 and "SIGKILL at site-mid-upload" in victim.tail()
    assert (fed.tmp / f"{c}-state" / "update-r0001.safetensors").is_file(), "the update was ready to go"
    assert any(e["site"] == c and e["status"] == "offline" for e in fed.events("status"))

    # its round-1 update, sent now, is late, and one for round 0 is for an old round. Sent before
    # the site restarts: a connection with the site's certificate has the site's client id (the
    # broker forces it to the certificate CN) and would displace the running site.
    from neurofed.coordinator import payload as codec
    from neurofed.wire.api import MessageKind
    from neurofed.wire.mqtt import MqttEndpoint

    # sent in the federation's run, as the site itself would (another run's message is refused
    # before any round check)
    ep = MqttEndpoint(fed.bundles / c, run=StateStore(fed.state).run_id())
    ep.start()
    try:
        late = (fed.tmp / f"{c}-state" / "update-r0001.safetensors").read_bytes()
        codec.decode(late)
        ep.send(MessageKind.UPDATE, 1, meta={"num_cases": 2}, payload=late, timeout=30)
        ep.send(MessageKind.UPDATE, 0, meta={"num_cases": 2}, payload=late, timeout=30)
        wait_for(
            lambda: len([e for e in fed.events("reject") if e["site"] == c and e["msg_round"] < 2]) >= 2,
            60,
            "rejections",
            fed.procs,
        )
    finally:
        ep.close()
    reasons = {e["reason"] for e in fed.events("reject") if e["site"] == c and e["msg_round"] < 2}
    assert reasons == {"late", "old-round"}
    fed.start_site(c)  # same state folder: it picks up the retained task and model

    wait_for(
        lambda: (c, 2) in {(e["site"], e["round"]) for e in fed.events("update")},
        240,
        "its round-2 update",
        fed.procs,
    )
    for s in (a, b):
        fed.edges[s].popen.send_signal(signal.SIGCONT)
    assert fed.coord.wait(300) == 0, fed.coord.tail()
    r2, r3 = fed.round_closed(2), fed.round_closed(3)
    assert r2["sites"] == [a, b, c], "the killed site rejoins the next round"
    assert sorted(r3["metrics"]) == [a, b, c] and not r3["train"]

    # the audit log is what the coordinator received: digest and size of each update
    received = {(e["site"], e["round"]): e for e in fed.events("update")}
    log_a = fed.audit(a)
    assert [(e["kind"], e["round"]) for e in log_a] == [
        ("update", 1),
        ("metrics", 1),
        ("update", 2),
        ("metrics", 2),
        ("metrics", 3),
    ]
    for e in log_a:
        assert len(e["sha256"]) == 64 and e["bytes"] > 0 and e["site"] == a and e["msg_id"]
        if e["kind"] == "update":
            got = received[(a, e["round"])]
            assert (e["sha256"], e["bytes"]) == (got["sha256"], got["bytes"])
            assert e["fields"]["num_cases"] == got["cases"]
    # the killed site's log: its round-1 update never left (it died first; its score of the
    # round's model would have followed the update), later ones did
    log_c = [(e["kind"], e["round"]) for e in fed.audit(c)]
    assert ("update", 1) not in log_c and ("metrics", 1) not in log_c
    assert ("update", 2) in log_c and ("metrics", 2) in log_c
    # every score sent reached the coordinator, those sent after their round closed too
    evaluated = {(e["site"], e["round"]) for e in fed.events("metrics")}
    assert {(a, 1), (b, 1), (a, 2), (b, 2), (c, 2)} <= evaluated


def test_coordinator_killed_at_each_point_resumes_without_losing_or_repeating_a_round(fed, mlflow_server):  # noqa: F811
    import mlflow

    from neurofed.mlflow_server.registry import model_name

    for s in fed.sites:
        fed.start_site(s)
    fed.wait_sites_ready()
    plan = [("after-aggregate", 1), ("after-persist", 1), ("after-announce", 2), ("after-register", 2)]
    fired = []
    for point, r in plan:
        p = fed.start_coordinator(
            rounds=3, min_sites=3, timeout=120, mlflow=mlflow_server, fault=point, fault_round=r
        )
        rc = p.wait(300)
        if rc == 0:  # the federation finished before this point was reached
            break
        assert rc == -9, p.tail()
        assert f"SIGKILL at {point}" in p.tail(80)
        fired.append(point)
    assert fired == [p for p, _ in plan], "every injection point must have been reached"
    last = fed.start_coordinator(rounds=3, min_sites=3, timeout=120, mlflow=mlflow_server)
    assert last.wait(300) == 0, last.tail()

    snap = StateStore(fed.state).load(federation=fed.federation)
    assert snap.round == 3 and snap.extra.get("finished")
    assert sorted(snap.extra["rounds"]) == ["1", "2", "3"], "no round lost"
    assert all(v["sites"] == fed.sites for v in snap.extra["rounds"].values())
    assert StateStore(fed.state).registered() == [1, 2, 3]
    # registered exactly once per round: the registry holds one version per round tag, and the
    # coordinators' logs show one registration per round across all five processes
    client = mlflow.MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    versions = client.search_model_versions(f"name = '{model_name(fed.federation)}'")
    rounds = sorted(int(v.tags["round"]) for v in versions)
    assert rounds == [1, 2, 3]
    logs = "".join(
        (fed.logs / f"{p.name}.log").read_text() for p in fed.procs if p.name.startswith("coordinator")
    )
    for r in (1, 2, 3):
        assert logs.count(f"round {r} registered as version") == 1
    # each round's model was evaluated by the sites and recorded on its version
    by_round = {int(v.tags["round"]): v for v in versions}
    assert all("val_dice" in by_round[r].tags for r in (1, 2, 3))
    # no site trained a round twice: one update per site and round in each audit log
    for s in fed.sites:
        firsts = [(e["round"]) for e in fed.audit(s) if e["kind"] == "update" and not e["resend"]]
        assert firsts == [1, 2, 3]


def test_coordinator_killed_in_the_evaluation_only_round_its_successor_gets_every_sites_metrics(fed):
    """The sites evaluate the last model and send their metrics to a coordinator that is gone.
    Its successor (a new session) announces the round again; sites that already evaluated send
    the same metrics again (receipts of the new session lack them) instead of evaluating again."""
    for s in fed.sites:
        fed.start_site(s)
    fed.wait_sites_ready()
    p = fed.start_coordinator(rounds=1, min_sites=3, timeout=120, fault="after-announce", fault_round=2)
    assert p.wait(300) == -9 and "SIGKILL at after-announce (round 2)" in p.tail(80)
    # every site has evaluated the last model before the successor starts
    wait_for(
        lambda: all(("metrics", 2) in {(e["kind"], e["round"]) for e in fed.audit(s)} for s in fed.sites),
        120,
        "every site's round-2 metrics",
        fed.procs,
    )
    last = fed.start_coordinator(rounds=1, min_sites=3, timeout=120)
    assert last.wait(240) == 0, last.tail()
    r2 = fed.round_closed(2)
    assert not r2["train"] and sorted(r2["metrics"]) == fed.sites, "every site scored the last model"
    for s in fed.sites:
        sent = [e for e in fed.audit(s) if e["kind"] == "metrics" and e["round"] == 2]
        assert sent and not sent[0]["resend"], s
        # evaluated once: any second send is a resend of the same figures
        assert all(e["resend"] for e in sent[1:]), s
        assert len({e["fields"]["dice"] for e in sent}) == 1, s


def test_broker_killed_during_uploads_everyone_reconnects_and_the_round_completes(fed):
    for s in fed.sites:
        fed.start_site(s)
    fed.wait_sites_ready()
    fed.start_coordinator(rounds=2, min_sites=3, timeout=120)
    fed.wait_round(1)
    # kill the broker as soon as the first round-2 update arrived: the others are training or uploading
    wait_for(
        lambda: [e for e in fed.events("update") if e["round"] == 2],
        120,
        "a round-2 update",
        fed.procs,
        poll=0.05,
    )
    fed.broker.kill()
    time.sleep(2.0)
    fed.broker.start()
    r2 = fed.wait_round(2, timeout=240)
    assert r2["sites"] == fed.sites, "every site's update arrives after the broker restart"
    assert fed.coord.wait(240) == 0, fed.coord.tail()
    logs = "".join(p.log.read_text(errors="replace") for p in fed.procs)
    assert "connected" in logs


def test_broker_restarted_without_its_saved_state_gets_the_round_again_from_the_coordinator(fed):
    """Mosquitto writes retained messages to disk every ``autosave_interval`` (30 s): a broker
    killed in between, or replaced without its data volume, comes back without the round's TASK
    and MODEL. A site that was down meanwhile then finds nothing to pick up, and the round would
    wait for it until the deadline and beyond (an extension re-publishes only the TASK). The
    coordinator publishes both again when its connection comes back.

    Staged deterministically: site c dies mid-upload in round 1 (its update stored, not sent),
    the broker is killed and its data folder removed before it restarts, and only then is c
    started again; the round closes only with c's update (min-sites 3)."""
    a, b, c, victim = fed.start_sites_one_dying_mid_upload()
    fed.start_coordinator(rounds=1, min_sites=3, timeout=300)
    assert victim.wait(120) == -9 and "SIGKILL at site-mid-upload" in victim.tail()
    wait_for(
        lambda: {e["site"] for e in fed.events("update") if e["round"] == 1} >= {a, b},
        120,
        "round-1 updates from the two healthy sites",
        fed.procs,
    )
    fed.broker.kill()
    shutil.rmtree(fed.bundles / "broker" / "data")
    fed.broker.start()
    wait_for(
        lambda: [e for e in fed.events("reannounce") if e["round"] == 1],
        60,
        "the coordinator to publish round 1 again",
        fed.procs,
    )
    fed.start_site(c)  # same state folder: the stored update goes out once task and model are back
    r1 = fed.wait_round(1, timeout=120)
    assert r1["sites"] == [a, b, c], "the site that was down takes part once the round is published again"
    assert fed.coord.wait(120) == 0, fed.coord.tail()
    r2 = fed.round_closed(2)
    assert sorted(r2["metrics"]) == [a, b, c] and not r2["train"]
    # c trained round 1 once: its stored update went out, it did not train again
    assert [e["round"] for e in fed.audit(c) if e["kind"] == "update"] == [1]


def test_a_site_stopped_with_sigterm_says_goodbye_to_the_broker(fed):
    """docker stop, systemd and launchers stop a site with SIGTERM: it leaves the broker with a
    DISCONNECT (Mosquitto: "disconnected."), not a cut TLS stream ("Protocol error")."""
    site = fed.sites[0]
    p = fed.start_site(site)
    fed.wait_sites_ready([site])
    log = fed.logs / "mosquitto.log"
    wait_for(lambda: f" as {site} (p5" in log.read_text(errors="replace"), 60, "the site's connection", [p])
    p.popen.send_signal(signal.SIGTERM)
    assert p.popen.wait(30) == 128 + signal.SIGTERM

    def ends() -> list[str]:  # how the broker logged the end of the site's connection
        return connection_ends(log.read_text(errors="replace"), site)

    wait_for(ends, 10, "the broker's log of the site leaving")
    assert all(line.endswith(" disconnected.") for line in ends()), ends()


def test_sites_started_between_two_federations_wait_for_the_next_one(fed):
    """The broker keeps a finished federation's last TASK (``done``, retained). Sites started
    before the next federation's coordinator find it first: they wait and take part in the next
    run instead of exiting at once (they exited with status 0 before)."""
    first = [fed.start_site(s) for s in fed.sites]
    fed.wait_sites_ready()
    fed.start_coordinator(rounds=1, min_sites=3, timeout=120)
    assert fed.coord.wait(240) == 0, fed.coord.tail()
    for p in first:  # they took part: the end ends them
        assert p.wait(60) == 0, p.tail()
    # the next federation: a new coordinator state, the sites started before its coordinator
    fed.state = fed.tmp / "coordinator-state-2"
    again = [fed.start_site(s) for s in fed.sites]

    def noted() -> bool:
        for p in again:
            assert p.alive(), f"{p.name} exited on the old federation's end:\n{p.tail()}"
        for s in fed.sites:
            f = fed.tmp / f"{s}-state" / "status.json"
            if not (f.is_file() and "note" in json.loads(f.read_text())):
                return False
        return True

    wait_for(noted, 120, "the sites to find the finished federation's end", fed.procs)
    time.sleep(1.0)
    noted()
    fed.start_coordinator(rounds=1, min_sites=3, timeout=120)
    assert fed.coord.wait(240) == 0, fed.coord.tail()
    for p in again:
        assert p.wait(60) == 0, p.tail()
        assert "finished before this site joined" in p.log.read_text(errors="replace")
    assert fed.round_closed(1)["sites"] == fed.sites, "the waiting sites trained the new run's round"


def test_a_coordinator_stopped_with_sigterm_keeps_its_rounds_and_says_goodbye(fed):
    """docker stop sends SIGTERM and SIGKILLs 10 s later: the coordinator stops within that (it
    does not wait for MLflow), leaves the broker with a DISCONNECT, and a restart with the same
    state goes on from the last persisted round without repeating it."""
    for s in fed.sites:
        fed.start_site(s)
    fed.wait_sites_ready()
    # enough rounds that the SIGTERM lands mid-federation (a tiny round takes 0.1-2 s; once the
    # federation is over, a SIGTERM during the final registry wait is ignored on purpose)
    p = fed.start_coordinator(rounds=ROUNDS_FOR_SIGTERM, min_sites=3, timeout=120)
    fed.wait_round(1)
    t0 = time.monotonic()
    p.popen.send_signal(signal.SIGTERM)
    assert p.popen.wait(10) == 128 + signal.SIGTERM, p.tail()
    print(f"the coordinator stopped {time.monotonic() - t0:.2f} s after SIGTERM")
    assert "stopping: the state in" in p.tail()
    log = fed.logs / "mosquitto.log"

    def ends() -> list[str]:
        return connection_ends(log.read_text(errors="replace"), "coordinator")

    wait_for(ends, 10, "the broker's log of the coordinator leaving")
    assert all(line.endswith(" disconnected.") for line in ends()), ends()
    again = fed.start_coordinator(rounds=ROUNDS_FOR_SIGTERM, min_sites=3, timeout=120)
    assert again.wait(240) == 0, again.tail()
    assert [e["round"] for e in fed.events("resume")] and fed.events("resume")[0]["round"] >= 1
    closed = [e["round"] for e in fed.events("round")]
    # every round closed once (the last: the evaluation-only round)
    assert sorted(closed) == list(range(1, ROUNDS_FOR_SIGTERM + 2))


def test_the_end_is_published_again_after_a_broker_restart_and_sigterm_waits_for_the_registry(fed):
    """Two gaps at the end of a federation, staged in one run:

    - The end is a retained TASK; a broker killed before its autosave (30 s), or replaced without
      its data, comes back without it. Site c is stopped (SIGSTOP) once its round-1 update is in and misses the
      end; the broker is then killed and restarted without its data. The coordinator lingers
      while c has not left, publishes the end again on its reconnect, and c ends on it.
    - Then the coordinator waits for its registry (an MLflow that accepts connections and never
      answers): two SIGTERMs during that wait are ignored, each with a log line, instead of the
      first one cutting it."""
    import socket

    mute = socket.socket()  # an "MLflow" that takes connections and never answers
    mute.bind(("127.0.0.1", 0))
    mute.listen(64)
    try:
        for s in fed.sites:
            fed.start_site(s)
        fed.wait_sites_ready()
        a, b, c = fed.sites
        coord = fed.start_coordinator(
            rounds=2, min_sites=2, timeout=8, mlflow=f"http://127.0.0.1:{mute.getsockname()[1]}"
        )
        # c is stopped as soon as its round-1 update is in: a tiny federation otherwise finishes
        # (and c with it) within a few tenths of a second of round 1's close
        wait_for(
            lambda: (c, 1) in {(e["site"], e["round"]) for e in fed.events("update")},
            240,
            "c's round-1 update",
            fed.procs,
            poll=0.02,
        )
        fed.edges[c].popen.send_signal(signal.SIGSTOP)
        fed.broker.kill()  # c's connection goes; the broker comes back with its state, c stays away
        fed.broker.start()
        wait_for(lambda: fed.events("done"), 120, "the end of the federation", fed.procs)
        for s in (a, b):
            assert fed.edges[s].wait(60) == 0, fed.edges[s].tail()
        fed.broker.kill()
        shutil.rmtree(fed.bundles / "broker" / "data")
        fed.broker.start()  # without the retained end
        fed.edges[c].popen.send_signal(signal.SIGCONT)
        assert fed.edges[c].wait(60) == 0, "c ends on the end published again:\n" + fed.edges[c].tail()
        wait_for(lambda: fed.events("reannounce-done"), 10, "the coordinator's record of it", fed.procs)
        assert coord.alive(), coord.tail()

        wait_for(
            lambda: "waiting at most" in coord.log.read_text(errors="replace"),
            60,
            "the coordinator's final registry wait",
            fed.procs,
        )
        for _ in range(2):
            coord.popen.send_signal(signal.SIGTERM)
            time.sleep(1.0)
        time.sleep(1.0)
        assert coord.alive(), "a SIGTERM cut the registry wait:\n" + coord.tail()
        assert coord.log.read_text(errors="replace").count("SIGTERM ignored: the federation is over") == 2
    finally:
        mute.close()


def test_a_site_revoked_live_is_cut_off_at_once_and_one_added_live_joins_the_next_round(fed, mlflow_server):  # noqa: F811
    """``neurofed provision --revoke/--add-site --live`` on a running federation. Site c sends its
    round-1 update and is then stopped (SIGSTOP), so round 2 waits for it (deadline 180 s). A new
    site d (c's hospital under a new id, on the same data) is added live, then c is revoked
    live: the broker (same PID) reloads its ACL and CRL and c's connection is closed by a
    session takeover; c's certificate is refused from then on; no other client disconnects;
    the coordinator takes the roster from its bundle and publishes it (ROSTER), the sites apply
    it, round 2 closes at once with a and b, and round 3 runs with a, b and d; the registry's
    versions name exactly those sites."""
    from neurofed.wire.errors import TransportError
    from neurofed.wire.membership import add_site_live, revoke_live
    from neurofed.wire.mqtt import MqttEndpoint

    a, b, c = fed.sites
    d = "site-04"
    for s in fed.sites:
        fed.start_site(s)
    fed.wait_sites_ready()
    coord = fed.start_coordinator(rounds=3, min_sites=2, timeout=180, mlflow=mlflow_server)
    wait_for(
        lambda: (c, 1) in {(e["site"], e["round"]) for e in fed.events("update")},
        240,
        "c's round-1 update",
        fed.procs,
        poll=0.05,
    )
    fed.edges[c].popen.send_signal(signal.SIGSTOP)
    wait_for(
        lambda: {e["site"] for e in fed.events("update") if e["round"] == 2} >= {a, b},
        240,
        "round-2 updates from a and b",
        fed.procs,
    )
    assert fed.round_closed(2) is None, "round 2 waits for c"
    broker = fed.broker.proc
    added = add_site_live(fed.bundles, d)
    assert added.broker_pid == broker.pid
    wait_for(lambda: [e for e in fed.events("roster") if e["added"] == [d]], 30, "roster v2", fed.procs)
    fed.start_site(d, data=c)

    log = fed.logs / "mosquitto.log"
    before = len(log.read_text(errors="replace"))
    change = revoke_live(fed.bundles, c)
    print(
        f"revoked live: broker reloaded after {change.reloaded_s:.2f} s, connection closed after {change.closed_s:.2f} s"
    )
    assert change.closed_s < 5.0
    assert broker.poll() is None and change.broker_pid == broker.pid, "the same broker process"
    wait_for(lambda: fed.round_closed(2), 60, "round 2 to close without c", fed.procs)
    after = log.read_text(errors="replace")[before:]
    assert f"Client {c} already connected, closing old connection" in after, after
    assert "Unable to open config file" not in after, "the broker read its config again"
    for other in (a, b, "coordinator"):
        assert not connection_ends(after, other), f"{other} was disconnected:\n{after}"
    # c's certificate: its next handshake fails
    ep = MqttEndpoint(fed.bundles / c)
    with pytest.raises(TransportError):
        ep.start(timeout=5)
    assert "certificate verify failed" in log.read_text(errors="replace")[before:]

    assert fed.round_closed(2)["sites"] == [a, b], "round 2 closes with the sites left, at quorum"
    r3 = fed.wait_round(3, timeout=240)
    assert r3["sites"] == [a, b, d], "the site added live takes part from the next round"
    assert coord.wait(240) == 0, coord.tail()
    snap = StateStore(fed.state).load()
    assert snap.extra["rounds"]["2"]["sites"] == [a, b]
    import mlflow

    from neurofed.mlflow_server.names import TAG_RUN, TAG_SITES
    from neurofed.mlflow_server.registry import model_name

    client = mlflow.MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    run = StateStore(fed.state).run_id()
    versions = [
        v
        for v in client.search_model_versions(f"name = '{model_name(fed.federation)}'")
        if v.tags.get(TAG_RUN) == run
    ]
    sites = {int(v.tags["round"]): v.tags[TAG_SITES] for v in versions}
    assert sites == {1: f"{a},{b},{c}", 2: f"{a},{b}", 3: f"{a},{b},{d}"}, (
        "round 2's version is made without c"
    )
    assert [e["version"] for e in fed.events("roster")] == [2, 3]
    for s in (a, b):  # the running sites took both rosters from the wire
        text = fed.edges[s].log.read_text(errors="replace")
        assert "roster version 2 applied" in text and "roster version 3 applied" in text, s
    assert broker.poll() is None and fed.broker.proc is broker
