"""Secure aggregation (SecAgg+, Bell et al. CCS 2020, with the consistency round of Bonawitz et
al. CCS 2017): the coordinator learns the weighted sum of the sites' updates and nothing about any
one of them, and the round survives sites dropping out down to the threshold.

A pure, transport-free library: ``SecAggClient`` (one per site and attempt) and ``SecAggServer``
(one per attempt at the coordinator) exchange plain bytes that the round state machines carry in
the wire's sealed and signed envelopes. See wire/secagg/README.md for the phases, messages,
parameters and threat model.
"""

from neurofed.wire.secagg.client import SecAggClient
from neurofed.wire.secagg.errors import (
    BothSharesRequested,
    MaskReuseRefused,
    SecAggParameterError,
    SecAggRoundFailed,
)
from neurofed.wire.secagg.messages import (
    KeySet,
    MaskedInput,
    Reveal,
    SurvivorList,
    UnmaskRequest,
    pack_bundles,
    unpack_bundles,
)
from neurofed.wire.secagg.params import (
    RoundContext,
    SecAggConfig,
    check_k_t,
    choose_ring,
    default_k_t,
    gaussian_tail_bound,
    neighbour_graph,
)
from neurofed.wire.secagg.server import SecAggResult, SecAggServer

__all__ = [
    "BothSharesRequested",
    "KeySet",
    "MaskReuseRefused",
    "MaskedInput",
    "Reveal",
    "RoundContext",
    "SecAggClient",
    "SecAggConfig",
    "SecAggParameterError",
    "SecAggResult",
    "SecAggRoundFailed",
    "SecAggServer",
    "SurvivorList",
    "UnmaskRequest",
    "check_k_t",
    "choose_ring",
    "default_k_t",
    "gaussian_tail_bound",
    "neighbour_graph",
    "pack_bundles",
    "unpack_bundles",
]
