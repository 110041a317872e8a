"""The MLflow fixtures (mlflow_server, postgres_database, s3_store, chromium) come from
tests/fixtures/mlflow.py, a pytest plugin listed in tests/conftest.py."""
