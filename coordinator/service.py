"""Wire the round machine to the real world: the bundle's MQTT endpoint, the state folder, the
initial model, and MLflow through the background registrar. ``neurofed coordinator`` is a thin
shell over ``run_coordinator``."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neurofed.coordinator.errors import CoordinatorError
from neurofed.coordinator.membership import RosterWatch
from neurofed.coordinator.registration import Registrar
from neurofed.coordinator.rounds import Coordinator, RoundConfig, RoundResult
from neurofed.coordinator.state import StateStore
from neurofed.coordinator.strategies import make_strategy
from neurofed.stopping import leaving

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class CoordinatorSettings:
    """Everything ``neurofed coordinator`` takes (see its --help)."""

    bundle: Path
    rounds: int
    min_sites: int | None = None
    round_timeout: float = 600.0
    strategy: str = "fedavg"
    local_epochs: float = 1
    mu: float = 0.01
    max_norm: float | None = None
    server_lr: float | None = None
    server_momentum: float | None = None
    state_dir: Path | None = None
    mlflow_uri: str | None = None
    model_config: dict[str, Any] | None = None
    spacing_from_sites: bool = False  # no --spacing: the median of the sites' reported medians
    seed: int = 0
    fp16: bool = False
    compression: str = "none"
    topk_density: float | None = None
    site_optimizer: str = "reset"
    lr_schedule: str = "constant"
    broker_host: str | None = None
    broker_port: int | None = None
    receipt_interval: float = 3.0
    init_weights: Path | None = None
    secure: Any = None  # coordinator.secure.SecureSettings: --secure-aggregation
    dp_noise_multiplier: float | None = None
    dp_max_grad_norm: float | None = None
    dp_target_epsilon: float | None = None
    dp_delta: float | None = None
    dp_accountant: str | None = None
    # client-level DP (DP-FedAvg); --max-norm is then each site's clip (the initial one if adaptive)
    dp_client_noise_multiplier: float | None = None
    dp_client_target_epsilon: float | None = None
    dp_client_delta: float | None = None
    dp_client_weights: str = "uniform"
    dp_client_weight_cap: int | None = None
    dp_client_adaptive_clip: bool = False
    dp_client_target_quantile: float | None = None
    dp_client_clip_lr: float | None = None
    dp_client_count_noise: float | None = None
    linger: float = 60.0


def client_privacy_config(s: CoordinatorSettings, sites: int) -> dict[str, Any] | None:
    """The federation's resolved DP-FedAvg settings from the ``--dp-client-*`` flags (None: no
    client-level DP), checked against the strategy before any round starts."""
    from neurofed.coordinator.client_dp import refuse_unsound
    from neurofed.models.client_privacy import DEFAULT_CLIP, ClientDPConfig
    from neurofed.models.privacy import DEFAULT_DELTA, PrivacyConfigError

    if s.dp_client_noise_multiplier is None and s.dp_client_target_epsilon is None:
        rest = (s.dp_client_delta, s.dp_client_weight_cap, s.dp_client_target_quantile, s.dp_client_clip_lr,
                s.dp_client_count_noise)  # fmt: skip
        if any(v is not None for v in rest) or s.dp_client_adaptive_clip or s.dp_client_weights != "uniform":
            raise CoordinatorError(
                "--dp-client-* settings need --dp-client-noise-multiplier or --dp-client-target-epsilon"
            )
        return None
    refuse_unsound(s.strategy, site_optimizer=s.site_optimizer, sample_dp=s.dp_noise_multiplier is not None)
    opt: dict[str, Any] = {}
    for flag, key in (
        ("dp_client_weight_cap", "weight_cap"),
        ("dp_client_target_quantile", "target_quantile"),
        ("dp_client_clip_lr", "clip_lr"),
        ("dp_client_count_noise", "count_noise"),
    ):
        if getattr(s, flag) is not None:
            opt[key] = getattr(s, flag)
    try:
        cfg = ClientDPConfig(
            noise_multiplier=s.dp_client_noise_multiplier,
            target_epsilon=s.dp_client_target_epsilon,
            delta=DEFAULT_DELTA if s.dp_client_delta is None else s.dp_client_delta,
            rounds=s.rounds,
            clip=DEFAULT_CLIP if s.max_norm is None else s.max_norm,
            weighting=s.dp_client_weights,
            adaptive=s.dp_client_adaptive_clip,
            sample_rate=1.0,  # every site is asked every round
            **opt,
        ).resolved(sites)
    except PrivacyConfigError as exc:
        raise CoordinatorError(str(exc)) from None
    return cfg.to_dict()


def privacy_config(s: CoordinatorSettings, model_config: dict[str, Any]) -> dict[str, Any] | None:
    """The task's ``dp`` from the ``--dp-*`` flags (None: no DP), checked against the strategy and
    the model before any round starts."""
    from neurofed.models.config import ModelConfig
    from neurofed.models.privacy import DEFAULT_DELTA, DPConfig, PrivacyConfigError

    given = (s.dp_noise_multiplier, s.dp_max_grad_norm, s.dp_target_epsilon, s.dp_delta)
    if all(v is None for v in given):
        if s.dp_accountant not in (None, "rdp"):
            raise CoordinatorError("--dp-accountant is sample-level DP-SGD's; add --dp-target-epsilon")
        return None
    try:
        cfg = DPConfig(
            max_grad_norm=1.0 if s.dp_max_grad_norm is None else s.dp_max_grad_norm,
            noise_multiplier=s.dp_noise_multiplier,
            target_epsilon=s.dp_target_epsilon,
            delta=DEFAULT_DELTA if s.dp_delta is None else s.dp_delta,
            rounds=s.rounds,
            accountant=s.dp_accountant or "rdp",
        )
    except PrivacyConfigError as exc:
        raise CoordinatorError(str(exc)) from None
    if s.strategy == "fedprox":
        raise CoordinatorError(
            "DP-SGD does not take FedProx's proximal term; choose another --strategy or drop the --dp-* flags"
        )
    if not ModelConfig.from_dict(model_config).dp_compatible:
        raise CoordinatorError("DP-SGD cannot train batch normalisation; use the default instance norm")
    return cfg.to_task()


def roster_digest(bundle_dir: Path) -> str:
    """SHA-256 of the signed roster: a snapshot only resumes the federation it was made for."""
    path = Path(bundle_dir) / "roster.json"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


def load_start_weights(path: Path, model_config: dict[str, Any]) -> dict:
    """Round 0 from a neurofed weights file (e.g. a pre-trained or centrally trained model): its
    architecture must be the one this federation trains."""
    import json

    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as fh:
            meta = fh.metadata() or {}
            weights = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as exc:
        raise CoordinatorError(f"--init-weights {path}: not a readable safetensors file ({exc})") from None
    cfg = meta.get("neurofed.model_config")
    if cfg:
        theirs = json.loads(cfg)
        keys = ("channels", "strides", "num_res_units", "out_channels", "in_channels")
        diff = [
            k
            for k in keys
            if k in theirs and k in model_config and list_of(theirs[k]) != list_of(model_config[k])
        ]
        if diff:
            raise CoordinatorError(
                f"--init-weights {path}: its UNet differs from --model-size ({', '.join(diff)}); "
                "pick the matching --model-size"
            )
    return weights


def list_of(v: Any) -> Any:
    return list(v) if isinstance(v, (list, tuple)) else v


# How long a stopping coordinator waits for registrations in flight (the rest are re-queued from the
# ledger on restart), and how long a finishing one waits for the registry to catch up.
STOP_GRACE_S = 5.0
REGISTRY_GRACE_S = 120.0


def tracking_params(
    s: CoordinatorSettings, sites: tuple[str, ...], min_sites: int, model_config: dict
) -> dict:
    """The federation's settings as the MLflow parent run's parameters."""
    params = {
        "strategy": s.strategy,
        "rounds": s.rounds,
        "min_sites": min_sites,
        "sites": ",".join(sites),
        "local_epochs": s.local_epochs,
        "round_timeout": s.round_timeout,
        "model": model_config,
        "seed": s.seed,
    }
    if s.site_optimizer != "reset":
        params["site_optimizer"] = s.site_optimizer
    if s.lr_schedule != "constant":
        params["lr_schedule"] = s.lr_schedule
    if s.strategy == "fedprox":
        params["mu"] = s.mu
    if s.max_norm is not None:
        params["max_norm"] = s.max_norm
    if s.secure is not None:
        params["secure_aggregation"] = {
            "clip": s.secure.clip, "k": s.secure.k, "t": s.secure.t, "bits": s.secure.bits,
            "max_cases": s.secure.max_total_weight,
        }  # fmt: skip
    if s.server_lr is not None:
        params["server_lr"] = s.server_lr
    if s.server_momentum is not None:
        params["server_momentum"] = s.server_momentum
    return params


def run_coordinator(s: CoordinatorSettings) -> list[RoundResult]:
    from neurofed.models.config import ModelConfig
    from neurofed.wire.bundle import load_bundle
    from neurofed.wire.mqtt import MqttEndpoint

    bundle = load_bundle(s.bundle)
    if bundle.role != "coordinator":
        raise CoordinatorError(
            f"{s.bundle} is the bundle of {bundle.participant!r} ({bundle.role}); give DIR/coordinator"
        )
    sites = tuple(bundle.roster.sites)
    model_config = dict(s.model_config or ModelConfig().to_dict())
    ModelConfig.from_dict(model_config)  # validate early
    state_dir = Path(s.state_dir or Path(s.bundle).parent / "coordinator-state")
    store = StateStore(state_dir)
    if s.secure is not None:
        from neurofed.coordinator.secure import refuse_unsound

        # one clear error at start; --max-norm is then each site's clip, not the coordinator's
        refuse_unsound(
            s.strategy,
            fp16=s.fp16,
            site_optimizer=s.site_optimizer,
            sites=len(sites),
            max_norm_at_coordinator=False,
        )
    dp_client = client_privacy_config(s, len(sites))
    strategy = make_strategy(
        s.strategy,
        mu=s.mu,
        # --max-norm is each site's clip under secure aggregation and client-level DP
        max_norm=None if s.secure is not None or dp_client is not None else s.max_norm,
        spill_dir=state_dir / "spill",
        server_lr=s.server_lr,
        server_momentum=s.server_momentum,
    )
    dp = privacy_config(s, model_config)
    cfg = RoundConfig(
        dp=dp,
        dp_client=dp_client,
        rounds=s.rounds,
        expected_sites=sites,
        min_sites=s.min_sites or len(sites),
        round_timeout=s.round_timeout,
        local_epochs=s.local_epochs,
        fp16=s.fp16,
        compression=s.compression,
        **({"topk_density": s.topk_density} if s.topk_density is not None else {}),
        site_optimizer=s.site_optimizer,
        lr_schedule=s.lr_schedule,
        receipt_interval=s.receipt_interval,
        secure=s.secure,
        linger=s.linger,
    )
    params = tracking_params(s, sites, cfg.min_sites, model_config)
    if dp is not None:
        params["dp"] = dp
        from neurofed.models.privacy import DPConfig

        log.info("%s", DPConfig(**dp).describe())
    if dp_client is not None:
        from neurofed.models.client_privacy import ClientDPConfig

        params["dp_client"] = dp_client
        log.info("%s", ClientDPConfig.from_dict(dp_client).describe())
    factory = None
    if s.mlflow_uri:

        def factory() -> Any:
            from neurofed.mlflow_server.tracking import FederationTracker

            return FederationTracker(s.mlflow_uri, bundle.federation, params, fed_run=store.run_id())

    registrar = Registrar(store, model_config, factory)

    def init() -> dict:
        if s.init_weights is not None:
            return load_start_weights(Path(s.init_weights), model_config)
        from neurofed.coordinator.init_weights import initial_weights

        log.info("building the initial UNet (seed %d) in a child process", s.seed)
        return initial_weights(model_config, seed=s.seed)

    # the state's federation run and the replay window are in place before the first message
    endpoint = MqttEndpoint(
        bundle, host=s.broker_host, port=s.broker_port, run=store.run_id(), seen_path=store.seen_path
    )
    endpoint.start()
    coord: Coordinator | None = None
    grace = REGISTRY_GRACE_S
    try:
        coord = Coordinator(
            endpoint,
            strategy,
            store,
            cfg,
            model_config=model_config,
            initial_weights=init,
            registrar=registrar,
            roster_digest=roster_digest(s.bundle),
            roster_keys={x: bundle.roster.get(x).signing_key() for x in sites},
            spacing_from_sites=s.spacing_from_sites,
            roster_watch=RosterWatch(s.bundle),
        )
        results = coord.run()
        # The federation is over and saved: a SIGTERM now (a launcher tearing everything down,
        # docker stop) does not cut the registry wait; its own bound ends it, SIGKILL sooner (a
        # restart re-queues what the registry ledger lacks).
        leaving(
            lambda: log.warning(
                "SIGTERM ignored: the federation is over; waiting at most %.0f s for the registry "
                "(SIGKILL stops it now; a restart with the same --state registers what is missing)",
                REGISTRY_GRACE_S,
            )
        )
        if registrar.pending() or registrar.busy():
            log.info("federation over; waiting at most %.0f s for the registry", grace)
    except (SystemExit, KeyboardInterrupt):
        # Stopped (docker stop's SIGTERM, Ctrl-C): the state on disk is whole up to the last
        # persisted round and a restart re-queues what the registry ledger lacks, so minutes of
        # waiting for MLflow would only get the process SIGKILLed (docker waits 10 s).
        grace = STOP_GRACE_S
        log.warning(
            "stopping: the state in %s holds every round up to %d; start the coordinator again "
            "with the same --state to go on",
            state_dir,
            coord.completed if coord is not None else 0,
        )
        raise
    finally:
        try:
            registrar.close(timeout=grace)
        finally:
            endpoint.close()  # DISCONNECT: the broker logs a goodbye, not a cut connection
    if registrar.failed:
        log.warning("%d registry jobs failed; see the log above", len(registrar.failed))
    return results
