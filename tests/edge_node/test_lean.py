"""A site process does not load MLflow, matplotlib or pandas through MONAI, and still trains."""

from __future__ import annotations

import subprocess
import sys

from neurofed.edge_node.lean import UNUSED_BY_SITES

PROBE = """
import sys
from neurofed.edge_node.lean import skip_unused_imports
print(sorted(skip_unused_imports()) if sys.argv[1] == "lean" else [])
import torch, monai
from monai.networks.nets import UNet
from monai.losses import DiceCELoss
from monai.metrics import HausdorffDistanceMetric
import neurofed.edge_node.transforms  # the site's own pipeline imports with them gone
net = UNet(3, 4, 1, (4, 8), (2,))
x = torch.randn(1, 4, 16, 16, 16)
y = (x[:, :1] > 0).float()
loss = DiceCELoss(sigmoid=True)(net(x), y)
loss.backward()
hd = HausdorffDistanceMetric(percentile=95)
hd(y, y)
assert float(hd.aggregate()) == 0.0
print([m for m in ("mlflow", "matplotlib", "pandas", "sklearn", "PIL") if sys.modules.get(m) is not None])
# VmHWM, not getrusage: Linux carries the parent's peak into ru_maxrss across fork + exec, so a
# child of a big pytest process would report the parent's size
print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) // 1024)
"""


def probe(mode: str) -> tuple[str, str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    marked, loaded, rss_mb = out.stdout.strip().splitlines()[-3:]
    return marked, loaded, int(rss_mb)


def test_site_process_skips_unused_monai_integrations_and_still_trains():
    # the plain import first: it also compiles any missing bytecode (a fresh venv's first import
    # of MONAI costs hundreds of MB more), so the two are compared on equal terms
    _, loaded_plain, rss_plain = probe("plain")
    marked, loaded, rss_lean = probe("lean")
    assert marked == str(sorted(UNUSED_BY_SITES))
    assert loaded == "[]"  # none of them came in through MONAI
    assert "mlflow" in loaded_plain  # ... where the plain import does bring them in
    assert rss_lean < rss_plain - 100, (rss_lean, rss_plain)  # here: about 320 vs 480 MB


def test_already_imported_modules_are_left_alone():
    import json  # noqa: F401 - imported, so it must stay usable

    from neurofed.edge_node.lean import skip_unused_imports

    assert skip_unused_imports(("json",)) == []
    assert sys.modules["json"] is not None
