"""The MLflow fixtures (tests/fixtures/mlflow.py) for this folder."""

from tests.fixtures.mlflow import (  # noqa: F401
    chromium,
    mlflow_server,
    mlflow_server_handle,
    postgres_database,
    s3_store,
)
