"""Keep a site process small: stop MONAI from importing what an edge node never uses.

``import monai`` imports every MONAI submodule, and with them its optional integrations when they
are installed: MLflow (for ``monai.handlers``), matplotlib, pandas, scikit-learn, Pillow,
onnx/onnxruntime, scipy's signal and stats packages (both kept: Opacus needs them). The kit installs those for the coordinator,
the MLflow server, inference and the experiment, so on a machine running ten sites they cost
about 170 MB per site process (482 -> 314 MB RSS after ``import torch, monai`` here) for
nothing: a site's transforms, UNet, DiceCE loss, Dice and HD95 (scipy.ndimage) need none of them.
Marking them absent in ``sys.modules`` before MONAI loads makes MONAI's ``optional_import`` treat
them as not installed, exactly as on a machine without them.
"""

from __future__ import annotations

import sys

UNUSED_BY_SITES = (
    "mlflow",
    "matplotlib",
    "pandas",
    "sklearn",
    "PIL",
    "onnx",
    "onnxruntime",
)
# scipy.signal and scipy.stats stay: Opacus (DP-SGD, which the coordinator's task may ask for
# after the site started) imports both with its accountants.


def skip_unused_imports(names: tuple[str, ...] = UNUSED_BY_SITES) -> list[str]:
    """Mark ``names`` as not installed for this process unless already imported; return those
    marked. Call it before anything imports MONAI, and only in processes that never need them."""
    marked = []
    for name in names:
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]  # import raises ImportError
            marked.append(name)
    return marked
