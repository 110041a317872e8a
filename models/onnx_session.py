"""onnxruntime sessions for the exported UNet, tuned for sliding-window inference.

One place decides the execution provider (CUDA when onnxruntime has it and it loads, CPU
otherwise, and the caller is told which), the thread count and the graph optimisation, so the
CLI, the parity check and the benchmark all run the same session.

Settings, and why (measured on 2 shared CPU cores, default UNet, 96^3 windows):
- ``ORT_ENABLE_ALL`` (also onnxruntime's default, set here so it cannot drift): constant folding,
  fusions and, on x86, the NCHWc blocked layout for the 3-D convolutions, which is where the time
  goes (Conv 62-72 %, ConvTranspose 16-20 % of kernel time).
- sequential execution and one inter-op thread: the graph is a chain, so parallel execution
  only adds scheduling; all threads go to intra-op (inside each convolution).
- the export itself (``neurofed.models.export.optimise_for_inference``) turns MONAI's single-slope PRelu
  into LeakyRelu: onnxruntime's generic PRelu kernel was 14-15 % of the time, LeakyRelu is 1-4 %.
- I/O binding with a caller-owned output array: the window's logits are written straight into a
  numpy array that torch then wraps without a copy.
- not adopted: an offline-optimised model (``optimized_model_filepath``) cut session creation from
  0.32-0.40 s to 0.14 s, too little against seconds of inference to justify a hardware-specific
  cache file.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from neurofed.models.errors import ModelError

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


class ProviderError(ModelError):
    """The execution provider the user asked for is not available."""


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def cuda_available() -> bool:
    """Whether this onnxruntime build offers the CUDA provider (it may still fail to load)."""
    return CUDA in available_providers()


def choose_providers(device: str = "auto") -> list[str]:
    """``auto``: CUDA first when available, then CPU; ``cpu``; ``cuda`` (error when absent)."""
    device = device.lower()
    if device == "cpu":
        return [CPU]
    if device == "cuda":
        if not cuda_available():
            raise ProviderError(
                "CUDA was asked for but this onnxruntime has no CUDAExecutionProvider; install "
                "`onnxruntime-gpu` (instead of `onnxruntime`) or run with --device cpu"
            )
        return [CUDA, CPU]
    if device != "auto":
        raise ProviderError(f"unknown device {device!r}; use auto, cpu or cuda")
    return [CUDA, CPU] if cuda_available() else [CPU]


@dataclass
class OrtModel:
    """An onnxruntime session over the UNet: ``run_numpy`` for arrays, ``__call__`` for the torch
    tensors MONAI's sliding window hands over."""

    session: Any
    path: Path
    provider: str
    threads: int
    input_name: str
    output_name: str
    out_channels: int
    _io_binding: bool = field(default=True, repr=False)

    @property
    def on_cuda(self) -> bool:
        return self.provider == CUDA

    def describe(self) -> str:
        if self.on_cuda:
            return "onnxruntime on CUDA (CUDAExecutionProvider)"
        why = "" if cuda_available() else ", no CUDA provider in this onnxruntime"
        threads = self.threads or "all"
        return f"onnxruntime on CPU (CPUExecutionProvider, {threads} threads{why})"

    def run_numpy(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.on_cuda or not self._io_binding:
            return self.session.run([self.output_name], {self.input_name: x})[0]
        out = np.empty((x.shape[0], self.out_channels, *x.shape[2:]), dtype=np.float32)
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.input_name, x)
        binding.bind_output(self.output_name, "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
        self.session.run_with_iobinding(binding)
        return out

    def __call__(self, x):  # torch.Tensor -> torch.Tensor, for monai's sliding window
        import torch

        arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        out = torch.from_numpy(self.run_numpy(arr))
        return out.to(x.device) if isinstance(x, torch.Tensor) and x.device.type != "cpu" else out


def session_options(threads: int = 0, *, optimized_path: Path | None = None, profile: bool = False):
    """The tuned ``SessionOptions`` (see the module docstring); ``threads=0`` lets onnxruntime
    use one thread per physical core."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = max(0, int(threads))
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    so.enable_profiling = profile
    return so


def create_session(
    onnx_path: str | os.PathLike[str],
    *,
    threads: int = 0,
    device: str = "auto",
    io_binding: bool = True,
) -> OrtModel:
    """Open ``onnx_path`` on the best provider for ``device``; raises ``ModelError`` subclasses
    for a file that is not a neurofed ONNX model and ``ProviderError`` for a missing provider."""
    import onnxruntime as ort

    from neurofed.models.export import read_onnx_config

    path = Path(onnx_path)
    config = read_onnx_config(path)  # clear error for missing/corrupt/foreign files
    providers = choose_providers(device)
    try:
        sess = ort.InferenceSession(str(path), session_options(threads), providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
        raise ModelError(f"{path}: onnxruntime cannot load this model ({exc})") from None
    used = sess.get_providers()[0]
    if device == "cuda" and used != CUDA:
        raise ProviderError(
            f"CUDA was asked for but onnxruntime fell back to {used} (CUDA/cuDNN libraries not found?)"
        )
    if providers[0] == CUDA and used != CUDA:
        log.warning("CUDAExecutionProvider did not load; running on %s", used)
    inp, outp = sess.get_inputs()[0], sess.get_outputs()[0]
    return OrtModel(
        session=sess,
        path=path,
        provider=used,
        threads=threads,
        input_name=inp.name,
        output_name=outp.name,
        out_channels=config.out_channels,
        _io_binding=io_binding,
    )
