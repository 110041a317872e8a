"""A site process does not load MLflow, matplotlib or pandas through MONAI, and still trains."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys, resource
from edge_node.lean import skip_unused_imports
print(sorted(skip_unused_imports()))
import torch, monai
from monai.networks.nets import UNet
from monai.losses import DiceCELoss
net = UNet(3, 4, 1, (4, 8), (2,))
x = torch.randn(1, 4, 16, 16, 16)
loss = DiceCELoss(sigmoid=True)(net(x), (x[:, :1] > 0).float())
loss.backward()
print([m for m in ("mlflow", "matplotlib", "pandas") if sys.modules.get(m) is not None])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def test_site_process_skips_unused_monai_integrations_and_still_trains():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    marked, loaded, rss_mb = out.stdout.strip().splitlines()[-3:]
    assert marked == "['matplotlib', 'mlflow', 'pandas']"
    assert loaded == "[]"  # none of them came in through MONAI
    assert int(rss_mb) < 450, rss_mb  # 482 MB here with them, about 350 without


def test_already_imported_modules_are_left_alone():
    import json  # noqa: F401 - imported, so it must stay usable

    from edge_node.lean import skip_unused_imports

    assert skip_unused_imports(("json",)) == []
    assert sys.modules["json"] is not None
