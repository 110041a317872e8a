"""The hospital side: read local NIfTI scans, train and evaluate the 3D-UNet locally, and take
part in federated rounds. Patient data never leaves this package's process: only weights, case
counts and aggregate metrics go out, through ``wire``."""
