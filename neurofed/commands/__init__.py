"""One module per sub-command. Each defines ``register(subparsers)`` and keeps heavy imports
(torch, MONAI, MLflow) inside its ``run`` so that ``neurofed --help`` stays instant."""
