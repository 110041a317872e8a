"""Starts and configures the MLflow tracking server and registry, and registers each round's
model (ONNX flavor + safetensors) with tags and aliases."""
