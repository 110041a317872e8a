"""Errors of the mlflow_server package: each says what went wrong, where, and what to do."""

from neurofed.errors import NeurofedError


class MlflowServerError(NeurofedError):
    """The tracking server could not be started or configured."""


class PortInUseError(MlflowServerError):
    """The port the server should listen on is already taken by another process."""


class BackendUnreachableError(MlflowServerError):
    """The backend store (PostgreSQL, SQLite path) or artifact store cannot be reached."""


class ServerStartError(MlflowServerError):
    """``mlflow server`` exited or did not answer its health check in time."""


class RegistryError(NeurofedError):
    """A registration, alias move or lookup in the MLflow model registry failed."""


class ModelFetchError(RegistryError):
    """A model URI that cannot be resolved or downloaded."""


class ModelIntegrityError(ModelFetchError):
    """A downloaded model file whose sha256 differs from the one registered with it."""
