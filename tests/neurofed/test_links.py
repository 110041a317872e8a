"""One federation round over shaped links: each site in its own network namespace behind a
rate-limited veth (tc tbf), bytes each way read from the veth counters, everything removed after."""

from __future__ import annotations

import argparse
import subprocess

import pytest

from neurofed.launch.links import ShapedLinks, unavailable

pytestmark = pytest.mark.slow
WHY = unavailable()


@pytest.mark.skipif(WHY is not None, reason=f"shaped links cannot be made here: {WHY}")
def test_one_shaped_round_with_two_sites_counts_bytes_each_way_and_cleans_up(tmp_path):
    from benchmarks import federation_overhead as fo
    from neurofed.launch.local import read_events

    args = argparse.Namespace(
        sites=2, cases_per_site=2, shape=32, model="tiny", rounds=1, epochs=1, fp16=False,
        compression="int8", topk_density=None, uplink_mbit=20.0, downlink_mbit=100.0,
        out=str(tmp_path / "work"), name=None,
    )  # fmt: skip
    run = fo.run_federation(args)
    assert run.rc == 0, (tmp_path / "work" / "logs" / "coordinator.log").read_text()[-3000:]
    events = read_events(run.work / "coordinator-state")
    rows = fo.link_rows(run, events)
    first = rows[0]
    # round 1: the whole fp32 model down to both sites, 8-bit changes up from them
    model_bytes = (run.work / "coordinator-state" / "rounds" / "global-r0001.safetensors").stat().st_size
    assert first["bytes_down"] > 2 * model_bytes, (first, model_bytes)
    assert 0.2 * model_bytes < first["bytes_up"] < 2 * model_bytes, (first, model_bytes)
    assert run.links["broker_host"].startswith("10.200.")
    # every namespace and link this run made is gone
    tag = f"nf{ShapedLinks(['x'], 1, 1).tag}"
    assert tag not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert tag not in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout


@pytest.mark.skipif(WHY is not None, reason=f"shaped links cannot be made here: {WHY}")
def test_a_failed_setup_leaves_nothing_behind(monkeypatch):
    import neurofed.launch.links as links

    calls = {"n": 0}
    real = links._tbf

    def failing(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise links.LinkError("tc refused")
        return real(*a, **kw)

    monkeypatch.setattr(links, "_tbf", failing)
    sl = ShapedLinks(["a", "b"], 20, 100)
    with pytest.raises(links.LinkError, match="tc refused"):
        sl.open()
    assert f"nf{sl.tag}" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"nf{sl.tag}" not in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout


@pytest.mark.skipif(WHY is not None, reason=f"shaped links cannot be made here: {WHY}")
def test_a_program_started_through_command_runs_behind_the_shaped_link_and_is_counted():
    """What the Flower SuperNodes go through: ``command`` puts a foreign program in the site's
    namespace, its upload is held to the uplink's rate, and the sampled veth counters give the
    round its bytes each way and its time on the wire."""
    import socket
    import sys
    import threading
    import time

    from benchmarks.peers.wire import LinkSampler, wire_rows

    size, up_mbit = 1_000_000, 8.0
    with ShapedLinks(["a"], up_mbit, 100.0) as links:
        server = socket.create_server((links.broker_host, 0))
        port = server.getsockname()[1]
        got = {"bytes": 0, "peer": None}

        def receive() -> None:
            conn, addr = server.accept()
            got["peer"] = addr[0]
            with conn:
                while chunk := conn.recv(65536):
                    got["bytes"] += len(chunk)

        thread = threading.Thread(target=receive, daemon=True)
        thread.start()
        host = links.broker_host
        send = f"import socket; s = socket.create_connection(({host!r}, {port})); s.sendall(b'x' * {size}); s.close()"
        with LinkSampler(links.counters) as sampler:
            t0 = time.time()
            done = subprocess.run(
                links.command("a", [sys.executable, "-c", send]), capture_output=True, timeout=30
            )
            thread.join(10)
            t1 = time.time()
        server.close()
    assert done.returncode == 0, done.stderr
    assert got == {"bytes": size, "peer": links.site_address("a")}
    assert t1 - t0 > 0.8 * size * 8 / (up_mbit * 1e6)  # 1 MB at 8 Mbit/s: about 1 s, not loopback speed
    (row,) = wire_rows(sampler.samples, {1: (t0 - 0.2, t1 + 0.2)}, up_mbit, 100.0)
    assert size <= row["bytes_up"] < 1.2 * size, row
    assert 0 < row["bytes_down"] < 0.2 * size, row  # acknowledgements only
    assert row["wire_s"] > 0.5, row


def test_bench_links_takes_flower_and_flare_as_peers_and_refuses_others():
    from benchmarks.links import parse_args, peers_of

    args = parse_args(["--peers", "flower,flare", "--sites", "3"])
    assert peers_of(args.peers) == ["flower", "flare"] and args.sites == 3
    assert peers_of(parse_args([]).peers) == []
    with pytest.raises(SystemExit, match="unknown"):
        peers_of("flower,pysyft")
