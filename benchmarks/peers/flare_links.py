"""NVIDIA FLARE under shaped links: why its peer arm is not shaped, and which of its message
quantization filters run on this machine.

The peer arm (``benchmarks.peers.flare_run``) runs FLARE's simulator: the server and every client
are workers of one ``nvflare simulator`` program talking over the host's loopback, so no client's
traffic can be put behind a link of its own. FLARE's POC mode (one process tree per client,
started by ``nvflare poc start``) could be shaped like Flower's SuperNodes; it is not built here.

The quantization check runs FLARE's own ``ModelQuantizer`` and ``ModelDequantizer`` filters on a
small state dict in the FLARE environment, for each of its quantization types, and reports which
ones run on this CPU, the bytes they send against fp32 and the largest round-trip error. FLARE
2.9's 8- and 4-bit types (``blockwise8``, ``float4``, ``normfloat4``) hand the tensors to
bitsandbytes after ``.cuda()``, so without a GPU they fail whatever bitsandbytes build is
installed; the check also says whether bitsandbytes' own CPU kernels quantize at all.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

from benchmarks.peers import flare_run

NOT_SHAPED = (
    "not shaped: the FLARE arm runs its simulator, one `nvflare simulator` program whose server and "
    "client workers talk over the host's loopback, so no client can be put behind its own link "
    "(FLARE's POC mode, a process tree per client, could be; not built)"
)

CHECK = r"""
import json, sys
import numpy as np
out = {}
try:
    import bitsandbytes, bitsandbytes.functional as F, torch
    out["bitsandbytes"] = bitsandbytes.__version__
    q, s = F.quantize_blockwise(torch.randn(4096))
    out["bitsandbytes_cpu_blockwise8"] = "runs"
except Exception as e:
    out.setdefault("bitsandbytes", f"not importable: {type(e).__name__}: {e}"[:300])
    out["bitsandbytes_cpu_blockwise8"] = f"{type(e).__name__}: {e}"[:300]
try:
    from nvflare.apis.dxo import DXO, DataKind
    from nvflare.apis.fl_context import FLContext
    from nvflare.apis.shareable import Shareable
    from nvflare.app_opt.pt.quantization.dequantizer import ModelDequantizer
    from nvflare.app_opt.pt.quantization.quantizer import ModelQuantizer
except Exception as e:
    out["filters"] = f"FLARE's quantization filters do not import: {type(e).__name__}: {e}"[:400]
    print(json.dumps(out)); sys.exit(0)
rng = np.random.default_rng(0)
weights = {"a": rng.standard_normal((64, 32, 3, 3, 3)).astype(np.float32), "b": rng.standard_normal(64).astype(np.float32)}
fp32 = sum(v.nbytes for v in weights.values())
types = {}
for t in ("float16", "blockwise8", "float4", "normfloat4", "adaquant"):
    try:
        dxo = DXO(data_kind=DataKind.WEIGHTS, data={k: v.copy() for k, v in weights.items()})
        q = ModelQuantizer(quantization_type=t).process_dxo(dxo, Shareable(), FLContext())
        sent = sum(np.asarray(v).nbytes for v in q.data.values())
        meta = q.get_meta_prop("quant_state") or {}
        for st in meta.values():
            for x in st.values():
                sent += getattr(x, "nbytes", 0)
        back = ModelDequantizer().process_dxo(q, Shareable(), FLContext())
        err = max(float(np.max(np.abs(np.asarray(back.data[k], dtype=np.float64) - weights[k]))) for k in weights)
        types[t] = {"runs": True, "bytes_vs_fp32": round(sent / fp32, 4), "max_abs_error": round(err, 5)}
    except Exception as e:
        types[t] = {"runs": False, "error": f"{type(e).__name__}: {e}"[:300]}
out["filters"] = types
print(json.dumps(out))
"""


def quantization_check(timeout: float = 300) -> dict[str, Any]:
    """Which of FLARE's quantization filters run here (in the FLARE environment)."""
    why = flare_run.available()
    if why:
        return {"skipped": why}
    done = subprocess.run(
        [str(flare_run.VENV / "bin" / "python"), "-c", CHECK],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=flare_run._env(),
    )
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"error": f"the check exited with {done.returncode}: {done.stderr.strip()[-1500:]}"}


def status() -> dict[str, Any]:
    """What ``benchmarks.links --peers flare`` reports for NVIDIA FLARE."""
    why = flare_run.available()
    out: dict[str, Any] = {"ok": False, "shaped": False, "reason": NOT_SHAPED}
    if why:
        out["quantization"] = {"skipped": why}
        return out
    out["version"] = flare_run.nvflare_version()
    out["quantization"] = quantization_check()
    return out
