"""The whole-stack launcher for one machine: synthetic data, a private broker, MLflow, the
coordinator and one ``neurofed edge`` process per site. It sits above the coordinator and the
edge node (``neurofed demo``, the experiment's federated arms and the benchmarks use it); a real
deployment starts the same commands on separate machines instead."""
