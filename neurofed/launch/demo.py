"""The one-command demo's runner: every part a deployment has, as local processes, with a live
rich view. Thin over ``neurofed.launch.local`` (the same helpers the failure tests use)."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neurofed.launch.local import (
    Broker,
    Proc,
    child_env,
    free_port,
    make_data,
    provision_sites,
    read_events,
    spawn,
    spawn_site,
)


@dataclass(frozen=True, kw_only=True)
class DemoSettings:
    out: str
    sites: int
    cases: int
    shape: int
    model: str
    rounds: int
    epochs: int
    timeout: float
    strategy: str = "fedavg"
    fp16: bool = False  # half-precision model broadcast and update deltas
    secure_aggregation: bool = False  # SecAgg+: only the sum of the masked updates is seen
    compression: str = "none"  # neurofed coordinator --compression
    kem: str = "x25519"  # neurofed provision --kem: how every sealed message wraps its key
    site_optimizer: str = "reset"
    mlflow: str | None = "embedded"  # "embedded", a URI, or None
    federation: str = "demo"
    # sample-level DP-SGD at every site (None: off); see neurofed coordinator --help
    dp_noise_multiplier: float | None = None
    dp_max_grad_norm: float | None = None
    dp_target_epsilon: float | None = None
    dp_delta: float | None = None
    # client-level DP (DP-FedAvg; None: off) and the sites' L2 clip; see neurofed coordinator --help
    dp_client_noise_multiplier: float | None = None
    dp_client_target_epsilon: float | None = None
    dp_client_adaptive_clip: bool = False
    max_norm: float | None = None

    @property
    def dp(self) -> bool:
        return self.dp_noise_multiplier is not None or self.dp_target_epsilon is not None

    @property
    def dp_client(self) -> bool:
        return self.dp_client_noise_multiplier is not None or self.dp_client_target_epsilon is not None


class _Mlflow:
    """The embedded MLflow: our server on a free port, else a local SQLite store (said which)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.uri: str | None = None
        self.kind = ""
        self.server: Any = None
        self.error = ""

    def start(self) -> None:
        try:
            from neurofed.mlflow_server.errors import PortInUseError
            from neurofed.mlflow_server.server import MlflowServer

            for attempt in range(3):  # a port can still be taken between picking and binding
                srv = MlflowServer(port=free_port(), state_dir=self.root, startup_timeout=180)
                try:
                    srv.start()
                    break
                except PortInUseError:
                    if attempt == 2:
                        raise
            self.server, self.uri, self.kind = srv, srv.url, "server"
        except Exception as exc:  # noqa: BLE001 - fall back, and say why
            self.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self.root.mkdir(parents=True, exist_ok=True)
            self.uri, self.kind = f"sqlite:///{self.root / 'mlflow.db'}", "sqlite"

    def stop(self) -> None:
        if self.server is not None:
            try:
                self.server.stop()
            except Exception:  # noqa: BLE001
                pass


def _status(state: Path) -> dict[str, Any]:
    try:
        return json.loads((state / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def _view(settings: DemoSettings, sites: list[str], out: Path, coord: Proc | None, note: str, t0: float):
    from rich.table import Table

    events = read_events(out / "coordinator-state")
    rounds = [e for e in events if e["event"] == "round"]
    announced = [e for e in events if e["event"] == "announce"]
    current = announced[-1]["round"] if announced else 0
    total = settings.rounds + 1
    what = "evaluation-only" if current == total else "training"
    title = (
        f"neurofed demo: round {current}/{settings.rounds} ({what}) - {len(rounds)} closed - "
        f"{time.time() - t0:.0f} s"
        if current
        else f"neurofed demo: {note} - {time.time() - t0:.0f} s"
    )
    table = Table(title=title)
    table.add_column("site")
    table.add_column("state")
    table.add_column("round")
    table.add_column("Dice (model evaluated)")
    table.add_column("updates sent")
    if settings.dp:
        table.add_column("epsilon spent")
    sent = {s: 0 for s in sites}
    for e in events:
        if e["event"] == "update":
            sent[e["site"]] = sent.get(e["site"], 0) + 1
    for s in sites:
        st = _status(out / f"{s}-state")
        dice = st.get("dice")
        row = [
            s,
            str(st.get("state", "starting")),
            str(st.get("round") or "-"),
            f"{dice:.3f} (r{st.get('evaluated_round')})" if isinstance(dice, float) else "-",
            str(sent.get(s, 0)),
        ]
        if settings.dp:
            eps = st.get("epsilon")
            row.append(f"{eps:.3f}" if isinstance(eps, (int, float)) else "-")
        table.add_row(*row)
    if coord is not None and not coord.alive():
        table.caption = f"coordinator exited with {coord.popen.returncode}"
    return table


def run_demo(s: DemoSettings) -> int:
    """Data, provisioning, broker, MLflow, N site agents and the coordinator, with a live view;
    then the federated model's scores, where its files are and what to try next."""
    from rich.console import Console

    console = Console()
    t0 = time.time()
    out = Path(s.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    summary = _prepare_data(s, data, console)
    sites = sorted(summary["sites"])
    run_dir = out / f"run-{time.strftime('%Y%m%d-%H%M%S')}"
    port = free_port()
    provision_sites(run_dir / "bundles", s.federation, sites, port, kem=s.kem)
    logs = run_dir / "logs"
    broker = Broker(run_dir / "bundles", port, logs / "mosquitto.log")
    logs.mkdir(parents=True, exist_ok=True)
    broker.start()
    console.print(
        f"provisioned [bold]{len(sites)}[/] sites (sealing KEM {s.kem}); Mosquitto (mTLS + ACL) on port {port}"
    )

    mlf = _Mlflow(out / "mlflow") if s.mlflow == "embedded" else None
    mlflow_thread = None
    if mlf is not None:
        mlflow_thread = threading.Thread(target=mlf.start, daemon=True)
        mlflow_thread.start()

    procs: list[Proc] = [
        spawn_site(site, run_dir / "bundles", data, run_dir, logs, verbose=True) for site in sites
    ]
    coord: Proc | None = None
    try:
        coord = _run_live(s, console, sites, run_dir, procs, mlf, mlflow_thread, summary["spacing"][0], t0)
        code = coord.popen.returncode
    finally:
        for p in procs:
            if p is not coord:
                p.stop(timeout=10)
        broker.stop()
    _print_results(s, console, run_dir, code, t0, mlf)
    return int(code or 0)


def _prepare_data(s: DemoSettings, data: Path, console: Any) -> dict[str, Any]:
    """Synthetic institutions, reused when a previous demo wrote the same ones."""
    shape = (s.shape,) * 3
    marker = data / "demo.json"
    want = {"sites": s.sites, "cases": s.cases, "shape": list(shape)}
    if marker.is_file() and json.loads(marker.read_text()).get("want") == want:
        console.print(f"[dim]reusing synthetic data in {data}[/]")
        return json.loads(marker.read_text())["summary"]
    with console.status(f"writing {s.cases} synthetic cases for {s.sites} institutions ({s.shape}^3) ..."):
        import shutil

        shutil.rmtree(data, ignore_errors=True)
        summary = make_data(data, s.sites, s.cases, shape)
        marker.write_text(json.dumps({"want": want, "summary": summary}))
    return summary


def _coordinator_args(
    s: DemoSettings, run_dir: Path, sites: list[str], spacing: float, uri: str | None
) -> list[str]:
    args = [
        "-v", "coordinator",
        "--bundle", str(run_dir / "bundles" / "coordinator"),
        "--rounds", str(s.rounds),
        "--min-sites", str(len(sites)),
        "--round-timeout", str(s.timeout),
        "--strategy", s.strategy,
        "--local-epochs", str(s.epochs),
        "--model-size", s.model,
        "--patch-size", str(s.shape),
        "--spacing", str(spacing),
        "--state", str(run_dir / "coordinator-state"),
    ]  # fmt: skip
    if uri:
        args += ["--mlflow", uri]
    if s.fp16:
        args.append("--fp16")
    elif s.compression != "none":
        args += ["--compression", s.compression]
    if s.secure_aggregation:
        args.append("--secure-aggregation")
    if s.site_optimizer != "reset":
        args += ["--site-optimizer", s.site_optimizer]
    for flag, value in (
        ("--dp-noise-multiplier", s.dp_noise_multiplier),
        ("--dp-max-grad-norm", s.dp_max_grad_norm),
        ("--dp-target-epsilon", s.dp_target_epsilon),
        ("--dp-delta", s.dp_delta),
        ("--dp-client-noise-multiplier", s.dp_client_noise_multiplier),
        ("--dp-client-target-epsilon", s.dp_client_target_epsilon),
        ("--max-norm", s.max_norm),
    ):
        if value is not None:
            args += [flag, str(value)]
    if s.dp_client_adaptive_clip:
        args.append("--dp-client-adaptive-clip")
    return args


def _run_live(
    s: DemoSettings,
    console: Any,
    sites: list[str],
    run_dir: Path,
    procs: list[Proc],
    mlf: _Mlflow | None,
    mlflow_thread: threading.Thread | None,
    spacing: float,
    t0: float,
) -> Proc:
    """Start the coordinator once every site agent and MLflow are up; show the live table until
    the coordinator exits."""
    from rich.live import Live

    coord: Proc | None = None
    logs = run_dir / "logs"
    with Live(console=console, refresh_per_second=2) as live:
        note = "starting MLflow and the site agents"
        while coord is None:
            ready = all((run_dir / f"{x}-state" / "status.json").is_file() for x in sites)
            mlflow_ready = mlflow_thread is None or not mlflow_thread.is_alive()
            dead = [p.name for p in procs if not p.alive()]
            if dead:
                raise SystemExit(f"edge process(es) {', '.join(dead)} exited; see {logs}")
            if ready and mlflow_ready:
                uri = mlf.uri if mlf is not None else s.mlflow
                coord = spawn(
                    "coordinator", _coordinator_args(s, run_dir, sites, spacing, uri), logs, child_env()
                )
                procs.append(coord)
            live.update(_view(s, sites, run_dir, coord, note, t0))
            time.sleep(0.5)
        while coord.alive():
            live.update(_view(s, sites, run_dir, coord, "", t0))
            time.sleep(0.5)
        live.update(_view(s, sites, run_dir, coord, "", t0))
    return coord


def _print_results(
    s: DemoSettings, console: Any, run_dir: Path, code: int | None, t0: float, mlf: _Mlflow | None
) -> None:
    """The federated model's scores per site, the Dice by round, and where everything is."""
    from rich.table import Table

    logs = run_dir / "logs"
    events = read_events(run_dir / "coordinator-state")
    final = [e for e in events if e["event"] == "round" and not e.get("train")]
    table = Table(title=f"Federated model (round {s.rounds}) scored at each site, validation split")
    table.add_column("site")
    table.add_column("Dice", justify="right")
    table.add_column("HD95 (mm)", justify="right")
    if final:
        for site, m in sorted(final[-1]["metrics"].items()):
            table.add_row(site, f"{m['dice']:.3f}", f"{m['hd95']:.1f}")
    console.print(table)
    evals = [e for e in events if e["event"] == "evaluation"]
    if evals:
        console.print("mean Dice by round: " + ", ".join(f"r{e['round']} {e['dice']:.3f}" for e in evals))
    if s.dp:
        console.print(privacy_summary(events))
    if s.dp_client:
        console.print(client_privacy_summary(events))
    console.print(f"finished in {time.time() - t0:.0f} s (exit {code}); logs in {logs}")
    console.print(f"model weights per round: {run_dir / 'coordinator-state' / 'rounds'}")
    if mlf is not None and mlf.uri:
        _print_registry(s, console, run_dir, mlf)
    elif s.mlflow:
        console.print(f"MLflow: {s.mlflow}")


def privacy_summary(events: list[dict[str, Any]]) -> str:
    """One line on what the federation's DP-SGD spent: the largest epsilon of any site (what bounds
    every patient), per site, and the sites that left with their budget spent."""
    spent: dict[str, float] = {}
    for e in events:
        if e["event"] == "update" and isinstance(e.get("epsilon"), (int, float)):
            spent[e["site"]] = max(spent.get(e["site"], 0.0), float(e["epsilon"]))
    left = [e["site"] for e in events if e["event"] == "left"]
    if not spent:
        return "privacy: DP-SGD on, but no site reported what it spent"
    worst = max(spent.values())
    # the delta and accountant behind the figure, from the rounds' privacy reports
    reports = [d for e in events if e["event"] == "round" for d in (e.get("dp") or {}).values()]
    delta = next((d["delta"] for d in reversed(reports) if isinstance(d, dict) and "delta" in d), None)
    line = (
        f"privacy (sample-level DP-SGD, unit: patient): epsilon {worst:.3f} (largest of any site; "
        + ", ".join(f"{k} {v:.3f}" for k, v in sorted(spent.items()))
        + ")"
    )
    if delta is not None:
        acc = next((d.get("accountant") for d in reversed(reports) if isinstance(d, dict)), None) or "rdp"
        line += f" at delta {float(delta):g} ({acc.upper()} accountant)"
    if left:
        line += f"; left with their budget spent: {', '.join(sorted(left))}"
    return line


def client_privacy_summary(events: list[dict[str, Any]]) -> str:
    """One line on what the federation's DP-FedAvg spent after its last aggregated round."""
    rounds = [e["dp_client"] for e in events if e["event"] == "round" and e.get("dp_client")]
    if not rounds:
        return "privacy (client-level DP-FedAvg): no round was aggregated, nothing spent"
    last = rounds[-1]
    line = (
        f"privacy (client-level DP-FedAvg, unit: hospital): epsilon {last['epsilon']:.3f} at delta "
        f"{last['delta']:g} after {last['rounds']} rounds (noise multiplier {last['noise_multiplier']:.3f}, "
        f"clip {last['clip']:.4g})"
    )
    ended = [
        e
        for e in events
        if e["event"] == "training-ended" and e.get("reason") == "client-privacy-budget-spent"
    ]
    if ended:
        line += "; training ended with the budget spent"
    return line


def _print_registry(s: DemoSettings, console: Any, run_dir: Path, mlf: _Mlflow) -> None:
    how = (
        "embedded MLflow server"
        if mlf.kind == "server"
        else f"local SQLite store (server failed: {mlf.error})"
    )
    console.print(f"MLflow: {how} at {mlf.uri}")
    onnx = _fetch_onnx(mlf.uri, s.federation, run_dir / "model")
    if onnx:
        console.print(f"ONNX of the champion: {onnx}")
        console.print(f"  try: neurofed infer SCAN.nii.gz --model {onnx} -o mask.nii.gz")
    model = f"models:/{s.federation}-unet@champion"
    if mlf.server is not None:
        # The registry's files (ONNX, plots) live in the server's proxied artifact store:
        # serve the same folder with them, not the bare SQLite file.
        console.print(
            f"look at the registry with its models and plots: neurofed mlflow-server --state {mlf.root}"
            "  (then open http://127.0.0.1:5000; add --port N if 5000 is taken)"
        )
        console.print(
            f"  and load the champion from it: neurofed infer SCAN.nii.gz --model {model} "
            "--tracking-uri http://127.0.0.1:5000 -o mask.nii.gz"
        )
    else:
        console.print(f"look at it: mlflow ui --backend-store-uri {mlf.uri}")
    mlf.stop()


def _fetch_onnx(uri: str, federation: str, dst: Path) -> Path | None:
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        from neurofed.mlflow_server.registry import fetch_model, model_name

        for alias in ("champion", "latest"):
            try:
                return fetch_model(
                    f"models:/{model_name(federation)}@{alias}", dst, tracking_uri=uri
                ).onnx_path
            except Exception:  # noqa: BLE001 - try the next alias
                continue
    except ImportError:
        return None
    return None
