"""Model and preprocessing configuration: small frozen dataclasses that travel with every
checkpoint and every exported ONNX file, so that inference never has to guess how the model
was trained."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

# BraTS modality names in the study's preferred order; FLAIR alone is the default input.
ALL_MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")

NORMS: tuple[str, ...] = ("instance", "batch")
"""``instance``: MONAI's default ``InstanceNorm3d`` (no affine parameters, no running statistics), which
DP-SGD accepts as it is: every sample is normalised by its own statistics only. ``batch`` mixes the
samples of a batch (and keeps running statistics): not compatible with per-sample clipping."""
ACTS: tuple[str, ...] = ("prelu", "leakyrelu")
"""``prelu``: MONAI's default (one learned slope per layer); Opacus computes its per-sample gradients
(and ConvTranspose3d's) through its slower functorch path. ``leakyrelu`` (slope 0.01) has no
parameters, so DP-SGD needs no per-sample gradient for it."""


@dataclass(frozen=True, kw_only=True)
class Preprocessing:
    """What an image must go through before the network sees it (the same at train and infer time).

    ``spacing`` is the voxel size in mm the model was trained at; ``normalisation`` is z-score over
    non-zero (brain) voxels per channel, as BraTS images are skull-stripped with zero background.
    """

    modalities: tuple[str, ...] = ("flair",)
    orientation: str = "RAS"
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    normalisation: str = "zscore-nonzero"
    patch_size: tuple[int, int, int] = (64, 64, 64)
    threshold: float = 0.5

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        known = {f.name for f in fields(cls)}
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
        return cls(**kwargs)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The MONAI UNet's shape. Defaults follow the study: 5 levels (16..256 channels), strides 2,
    2 residual units per block: about 4.8 M parameters, 19 MB in fp32."""

    channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    strides: tuple[int, ...] = (2, 2, 2, 2)
    num_res_units: int = 2
    out_channels: int = 1
    dropout: float = 0.0
    norm: str = "instance"
    act: str = "prelu"
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    # What the model was trained on, for inference's plausibility checks (None: unknown):
    # {"spacing": {"median", "min", "max", "cases", "rule"}, "label_ml": {"min", "median", "max", "cases"}}
    training_data: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        if self.act not in ACTS:
            raise ValueError(f"act must be one of {', '.join(ACTS)}, got {self.act!r}")
        if len(self.strides) != len(self.channels) - 1:
            raise ValueError(
                f"UNet needs len(strides) == len(channels) - 1, got channels={self.channels} "
                f"strides={self.strides}"
            )

    @property
    def in_channels(self) -> int:
        return len(self.preprocessing.modalities)

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.preprocessing.modalities

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["in_channels"] = self.in_channels
        if d["training_data"] is None:  # configs without it keep their old JSON and digest
            del d["training_data"]
        # the layer choices appear only when they differ from MONAI's defaults, so every config
        # written before they existed keeps its JSON and its digest
        for name, default in (("norm", "instance"), ("act", "prelu")):
            if d[name] == default:
                del d[name]
        return d

    @property
    def dp_compatible(self) -> bool:
        """Whether DP-SGD's per-sample clipping can train this network (no layer mixes samples)."""
        return self.norm != "batch"

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def digest(self) -> str:
        """Short, stable identity of the configuration (logged and tagged in the registry); what
        the model was trained on (``training_data``) is not part of its identity."""
        d = self.to_dict()
        d.pop("training_data", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def with_training_data(self, **data: Any) -> ModelConfig:
        """A copy recording what it was trained on (``spacing``, ``label_ml``), merged into any
        record it has."""
        from dataclasses import replace

        merged = dict(self.training_data or {})
        merged.update({k: v for k, v in data.items() if v is not None})
        return replace(self, training_data=merged or None)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for k, v in data.items():
            if k not in known:
                continue
            if k == "preprocessing":
                kwargs[k] = Preprocessing.from_dict(v) if isinstance(v, dict) else v
            elif k == "training_data":
                kwargs[k] = dict(v) if isinstance(v, dict) else None
            elif isinstance(v, list):
                kwargs[k] = tuple(v)
            else:
                kwargs[k] = v
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls.from_dict(json.loads(text))

    @classmethod
    def small(cls, **pre: Any) -> ModelConfig:
        """The 1.2 M-parameter UNet (8..128 channels) used by quick demos and the peer benchmark."""
        return cls(channels=(8, 16, 32, 64, 128), preprocessing=Preprocessing(**pre))

    @classmethod
    def tiny(cls, **pre: Any) -> ModelConfig:
        """A 3-level UNet (4, 8, 16) for tests: trains on 32^3 volumes in seconds."""
        return cls(channels=(4, 8, 16), strides=(2, 2), num_res_units=1, preprocessing=Preprocessing(**pre))


PRESETS = {"default": ModelConfig, "small": ModelConfig.small, "tiny": ModelConfig.tiny}


def preset(name: str, **pre: Any) -> ModelConfig:
    """A named model size: ``default`` (4.8 M params), ``small`` (1.2 M) or ``tiny`` (tests)."""
    try:
        factory = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model size {name!r}; choose one of {', '.join(PRESETS)}") from None
    if name == "default":
        return ModelConfig(preprocessing=Preprocessing(**pre))
    return factory(**pre)
