"""Errors of the models package."""

from neurofed.errors import NeurofedError


class ModelError(NeurofedError):
    """A model, checkpoint or export that cannot be used; the message says why and what to do."""


class SpatialSizeError(ModelError):
    """An input whose spatial size the UNet cannot take (not a multiple of 2**len(strides))."""


class CheckpointError(ModelError):
    """A weights file that is missing, corrupt, not safetensors, or for another model."""
