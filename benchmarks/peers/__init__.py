"""Peers side by side: the same 10-site FedAvg task run by neurofed, Flower and NVIDIA FLARE.

``benchmarks.peer_compare`` is the entry point. Each framework runs in its own recommended
multi-process deployment, with its own virtual environment for the peers (``scripts/peer_env.sh``),
and every framework's clients call the very same ``neurofed.edge_node.training.LocalTrainer`` so that the
training work is identical and only the framework around it differs.

Modules here import only the standard library and numpy at module level, because the peer apps
(running in the peer environments) use :mod:`benchmarks.peers.measure` too.
"""
