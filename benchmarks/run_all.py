"""Run every benchmark in its own process and collect the JSON figures (``make bench``).

Each benchmark module prints one JSON object and writes ``benchmarks/results/<name>.json``.
Separate processes keep one benchmark's memory and threads from skewing the next.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
# peer_compare needs its own environment (scripts/peer_env.sh): `make bench-peers` runs it.
SKIP = {"__init__", "run_all", "common", "peer_compare"}
# benchmarks run a second time with other options, under their own name: (module, arguments)
VARIANTS = {
    "coordinator_memory_secagg": (
        "coordinator_memory",
        [
            "--secure-aggregation",
            "--sites",
            "10,50",
            "--per-process",
            "10",
            "--name",
            "coordinator_memory_secagg",
        ],
    ),
}


def machine() -> dict[str, object]:
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
    }


def main(argv: list[str] | None = None) -> int:
    names = argv if argv else sorted([*(p.stem for p in HERE.glob("*.py") if p.stem not in SKIP), *VARIANTS])
    RESULTS.mkdir(exist_ok=True)
    summary: dict[str, object] = {"machine": machine(), "benchmarks": {}}
    failed = []
    for name in names:
        t0 = time.perf_counter()
        print(f"== {name}", file=sys.stderr, flush=True)
        module, args = VARIANTS.get(name, (name, []))
        proc = subprocess.run(
            [sys.executable, "-m", f"benchmarks.{module}", *args],
            cwd=HERE.parent,
            capture_output=True,
            text=True,
        )
        took = time.perf_counter() - t0
        if proc.returncode != 0:
            failed.append(name)
            print(proc.stderr[-3000:], file=sys.stderr)
            summary["benchmarks"][name] = {
                "error": proc.stderr.strip().splitlines()[-1:] or ["failed"],
                "seconds": took,
            }
            continue
        try:
            figures = json.loads(proc.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            figures = {"raw": proc.stdout[-2000:]}
        summary["benchmarks"][name] = {"seconds": round(took, 1), "figures": figures}
    (RESULTS / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
