"""End-to-end transfer through a real Mosquitto: neurofed's encrypted, signed, chunked UPDATE
against ``mosquitto_pub -f`` / ``mosquitto_sub -C 1`` moving the same bytes as one message over the
same TLS listener (ratio; goal <= 1.0), plus wire bytes over payload bytes (goal <= 1.02).

    .venv/bin/python -m benchmarks.wire_transfer [--sizes 20,100] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.common import emit


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="20,100", help="payload sizes in MiB")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    from neurofed.wire.api import MessageKind
    from neurofed.wire.chunking import packet_size
    from neurofed.wire.mqtt import MqttEndpoint
    from neurofed.wire.sealing import seal_message
    from tests.fixtures.broker import BrokerInfo, provision_federation

    pub, sub = shutil.which("mosquitto_pub"), shutil.which("mosquitto_sub")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = provision_federation(Path(tmp) / "bundles")
        from neurofed.wire.bundle import load_bundle

        port = load_bundle(root / "coordinator").broker_port
        # the tools send one message of the full size: lift the packet limit to MQTT's maximum
        conf = root / "broker" / "mosquitto.conf"
        lines = conf.read_text().splitlines()
        conf.write_text(
            "\n".join("max_packet_size 268435455" if x.startswith("max_packet_size") else x for x in lines)
        )
        broker = BrokerInfo("localhost", port, root, Path(tmp) / "mosquitto.log")
        broker.start()
        coord, site = MqttEndpoint(root / "coordinator"), MqttEndpoint(root / "site-a")
        coord.start(20)
        site.start(20)
        try:
            for mib in [float(s) for s in args.sizes.split(",")]:
                n = int(mib * 1024 * 1024)
                data = os.urandom(n)
                sealed = seal_message(site.bundle, MessageKind.UPDATE, 1, {"num_cases": 1}, data)
                wire = sum(packet_size(t, len(f)) for t, f in sealed.frames)
                ours = []
                for _ in range(args.repeat):
                    t0 = time.perf_counter()
                    site.send(MessageKind.UPDATE, 1, meta={"num_cases": 1}, payload=data, timeout=300)
                    while True:
                        m = coord.receive(timeout=120)
                        if m is None or m.kind is MessageKind.UPDATE:
                            break
                    ours.append(time.perf_counter() - t0)
                    assert m is not None and len(m.payload) == n
                    del m
                row = {
                    "neurofed_s": round(min(ours), 3),
                    "neurofed_MiBps": round(mib / min(ours), 1),
                    "wire_bytes_over_payload": round(wire / n, 5),
                }
                if pub and sub:
                    f = Path(tmp) / "blob"
                    f.write_bytes(data)
                    tls = [
                        "-h",
                        "localhost",
                        "-p",
                        str(port),
                        "-V",
                        "mqttv5",
                        "--cafile",
                        str(root / "broker/ca.crt"),
                    ]
                    cb = root / "coordinator"  # the only identity that may use a non-protocol topic
                    tools = []
                    for i in range(args.repeat):
                        topic = f"nf/testfed/bench/{i}"  # not subscribed by the endpoints
                        s = subprocess.Popen(
                            [sub, *tls, "--cert", str(cb / "client.crt"), "--key", str(cb / "client.key")]
                            + ["-q", "1", "-t", topic, "-C", "1", "-W", "300", "-i", f"bench-sub-{i}"],
                            stdout=subprocess.DEVNULL,
                        )
                        time.sleep(1.0)
                        t0 = time.perf_counter()
                        subprocess.run(
                            [pub, *tls, "--cert", str(cb / "client.crt"), "--key", str(cb / "client.key")]
                            + ["-q", "1", "-t", topic, "-f", str(f), "-i", f"bench-pub-{i}"],
                            check=True,
                            timeout=300,
                        )
                        s.wait(300)
                        tools.append(time.perf_counter() - t0)
                    f.unlink()
                    row["mosquitto_tools_s"] = round(min(tools), 3)
                    row["neurofed_over_tools"] = round(min(ours) / min(tools), 3)
                results[f"{mib:g}MiB"] = row
        finally:
            site.close()
            coord.close()
            broker.stop()
    emit(
        "wire_transfer",
        {
            "transfers": results,
            "notes": "best of --repeat; sender and receiver endpoints share one Python process; "
            "tools = mosquitto_pub -f to mosquitto_sub -C 1, QoS 1, same mTLS listener",
            "goals": "wire_bytes_over_payload <= 1.02; neurofed_over_tools <= 1.0",
        },
    )


if __name__ == "__main__":
    main()
