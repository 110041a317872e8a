"""neurofed: federated brain-tumour segmentation for hospitals (CLI and configuration).

The library lives in the sibling packages of this distribution: ``edge_node`` (site side),
``wire`` (the secure MQTT protocol both sides share), ``coordinator`` (rounds and aggregation),
``models`` (3D-UNet, ONNX export, inference) and ``mlflow_server`` (tracking and registry).
"""

__version__ = "0.1.0"
