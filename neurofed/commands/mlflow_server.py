"""``neurofed mlflow-server``: the federation's tracking server and model registry."""

from __future__ import annotations

import argparse

NAME = "mlflow-server"
EXAMPLE = """\
examples:
  neurofed mlflow-server                                  # SQLite + local artifacts under state/mlflow
  neurofed mlflow-server --host 0.0.0.0 --port 5000 --state /var/lib/neurofed/mlflow
  NEUROFED_BACKEND_STORE_URI=postgresql://mlflow:PW@db:5432/mlflow \\
  MLFLOW_S3_ENDPOINT_URL=http://minio:9000 AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... \\
    neurofed mlflow-server --artifacts-destination s3://neurofed-artifacts

Artifacts are always proxied by the server (clients upload over HTTP), so a coordinator on
another host needs only the tracking URI. One worker and no job runner keep it near 0.5 GB.
Stop with Ctrl-C or SIGTERM.
"""


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        NAME,
        help="run the MLflow tracking server and model registry",
        description=(
            "Start `mlflow server` for the federation: zero set-up by default (SQLite file and "
            "artifacts in --state), PostgreSQL and S3-compatible stores for production. Waits "
            "until it answers /health, prints the UI address, stops cleanly on Ctrl-C/SIGTERM."
        ),
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0: all; default 127.0.0.1)")
    p.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    p.add_argument("--state", default="state/mlflow", help="folder for the SQLite file, artifacts and log")
    p.add_argument(
        "--backend-store-uri",
        default=None,
        help="SQLAlchemy URI of the backend store, e.g. postgresql://USER:PW@HOST:5432/DB (default: SQLite in --state)",
    )
    p.add_argument(
        "--artifacts-destination",
        default=None,
        help="where the server stores artifacts: a folder or s3://bucket (with MLFLOW_S3_ENDPOINT_URL, AWS_*) "
        "(default: --state/artifacts)",
    )
    p.add_argument("--workers", type=int, default=1, help="uvicorn workers (default 1: about 0.5 GB)")
    p.add_argument("--startup-timeout", type=float, default=120.0, help="seconds to wait for /health")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import signal
    import threading

    from neurofed.mlflow_server.server import MlflowServer

    server = MlflowServer(
        host=args.host,
        port=args.port,
        state_dir=args.state,
        backend_store_uri=args.backend_store_uri,
        artifacts_destination=args.artifacts_destination,
        workers=args.workers,
        startup_timeout=args.startup_timeout,
    )
    stop = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        stop.set()

    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        from rich.console import Console

        console = Console(stderr=True)
        with console.status(f"starting MLflow on {args.host}:{args.port} ({server.describe()})"):
            server.start()
        try:
            print(f"MLflow UI: {server.url}", flush=True)
            print(f"tracking URI: {server.url}  ({server.describe()})", flush=True)
            print("Ctrl-C or SIGTERM stops it.", flush=True)
            while not stop.wait(1.0):
                if not server.alive():
                    print(
                        f"neurofed mlflow-server: error: the server exited; log:\n{server.log_tail()}",
                        flush=True,
                    )
                    return 1
        finally:
            server.stop()
        print("MLflow server stopped.", flush=True)
        return 0
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
