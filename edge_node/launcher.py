"""Start, inspect and stop a hospital's edge-node container through the Docker Engine API.

A site operator gets a bundle and a data folder; ``neurofed site up`` turns them into one container
with the right mounts, restart policy and (optionally) GPUs, so nobody has to assemble a long
``docker run`` line by hand. Everything goes through the ``docker`` SDK (no shelling out), and every
container it creates carries ``io.neurofed.*`` labels so ``status``/``logs``/``down`` find it again.

Mounts:
- ``/data/<site>``: the scans, bind-mounted read-only: the container cannot alter patient data.
  The folder must hold the federation's ``splits.json`` (it cannot be written there).
- ``/bundle``: the provisioning bundle. By default it is *copied* into the container before it
  starts, owned by the image's non-root user with private modes (``bundle_mode="copy"``): a bind
  mount keeps the host's owner and ``0600`` modes, which a non-root container user cannot read
  unless the host folder is ``chown``-ed to that uid. The copy lives only in this container's
  writable layer (never in an image layer) and disappears with ``down``. ``bundle_mode="mount"``
  bind-mounts it read-only instead, for hosts that prepared the ownership.
- ``/state``: a named volume (``<name>-state``) that survives restarts and ``down`` (unless purged).
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from neurofed.edge_node.errors import EdgeNodeError

DEFAULT_IMAGE = "neurofed:latest"
IMAGE_UID = 10001  # the Dockerfile's non-root user
LABEL = "io.neurofed"
ROLE_LABEL = f"{LABEL}.role"
SITE_LABEL = f"{LABEL}.site"
FEDERATION_LABEL = f"{LABEL}.federation"


class LauncherError(EdgeNodeError):
    """The site container cannot be started, found or stopped; the message says what to do."""


class EngineUnavailable(LauncherError):
    """No Docker engine answers."""


@dataclass(frozen=True)
class SiteSpec:
    """What ``site up`` starts. ``gpus``: None, "all", or a comma-separated list of device ids."""

    bundle: Path
    data: Path
    image: str = DEFAULT_IMAGE
    name: str | None = None
    gpus: str | None = None
    network: str | None = None
    bundle_mode: str = "copy"
    extra_args: Sequence[str] = ()
    environment: Mapping[str, str] = field(default_factory=dict)
    # Overrides of the image's HEALTHCHECK timing (docker.types.Healthcheck keys, nanoseconds),
    # e.g. {"interval": 2_000_000_000, "retries": 1}; the image's check command stays.
    healthcheck: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class SiteStatus:
    name: str
    site: str
    status: str  # created, running, restarting, exited, ...
    health: str | None  # starting, healthy, unhealthy, or None without a health check
    image: str
    restarts: int
    started_at: str
    health_log: str = ""


def site_identity(bundle: Path) -> tuple[str, str]:
    """``(participant, federation)`` from the bundle's bundle.toml (keys are not read here)."""
    cfg_path = bundle / "bundle.toml"
    try:
        cfg = tomllib.loads(cfg_path.read_text())
        return str(cfg["participant"]), str(cfg["federation"])
    except FileNotFoundError:
        raise LauncherError(
            f"{bundle} is not a site bundle (no bundle.toml); give --bundle DIR/<site> as written by "
            "`neurofed provision`"
        ) from None
    except (tomllib.TOMLDecodeError, KeyError) as exc:
        raise LauncherError(f"{cfg_path} is invalid ({exc}); re-provision this site") from None


def default_name(site: str) -> str:
    return f"neurofed-{site}"


def device_requests(gpus: str | None) -> list[Any]:
    """Docker DeviceRequests for ``--gpus`` (what ``docker run --gpus`` sends)."""
    if not gpus:
        return []
    from docker.types import DeviceRequest

    if gpus == "all":
        return [DeviceRequest(count=-1, capabilities=[["gpu"]])]
    if gpus.isdigit() and "," not in gpus:
        return [DeviceRequest(count=int(gpus), capabilities=[["gpu"]])]
    ids = [g.strip() for g in gpus.split(",") if g.strip()]
    if not ids:
        raise LauncherError(f"--gpus {gpus!r}: give 'all', a count, or device ids like 0,1")
    return [DeviceRequest(device_ids=ids, capabilities=[["gpu"]])]


def bundle_archive(bundle: Path, uid: int = IMAGE_UID, gid: int = IMAGE_UID) -> bytes:
    """A tar of the bundle's files for ``put_archive``: owned by the image user, no group/other
    access (the agent refuses keys readable by others). Only regular files; links are refused."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        root = tarfile.TarInfo("bundle")
        root.type, root.mode, root.uid, root.gid = tarfile.DIRTYPE, 0o700, uid, gid
        tar.addfile(root)
        for path in sorted(bundle.rglob("*")):
            rel = path.relative_to(bundle)
            if rel.parts and rel.parts[0] in ("data", "__pycache__"):
                continue
            if path.is_symlink():
                raise LauncherError(f"{path} is a symbolic link; bundles must hold plain files")
            info = tarfile.TarInfo(f"bundle/{rel.as_posix()}")
            info.uid, info.gid = uid, gid
            if path.is_dir():
                info.type, info.mode = tarfile.DIRTYPE, 0o700
                tar.addfile(info)
            elif path.is_file():
                st = path.stat()
                info.size, info.mtime = st.st_size, int(st.st_mtime)
                info.mode = stat.S_IMODE(st.st_mode) & 0o700 | 0o400
                with path.open("rb") as fh:
                    tar.addfile(info, fh)
    return buf.getvalue()


class SiteLauncher:
    """The Docker side of ``neurofed site``. ``client``: a ``docker.DockerClient`` (default: from
    the environment, i.e. DOCKER_HOST or the local socket)."""

    def __init__(self, client: Any = None, *, timeout: float = 60.0) -> None:
        if client is None:
            client = connect(timeout=timeout)
        self.client = client

    # -- up -------------------------------------------------------------------------------------
    def up(self, spec: SiteSpec, *, replace: bool = False) -> SiteStatus:
        """Create and start the site's container; LauncherError when one with the name exists
        (unless ``replace``), when the image is missing or the paths are wrong."""
        import docker.errors
        from docker.types import Mount

        bundle, data = spec.bundle.resolve(), spec.data.resolve()
        site, federation = site_identity(bundle)
        if not data.exists():
            raise LauncherError(
                f"data path {data} does not exist; give --data the folder with this site's scans"
            )
        if spec.bundle_mode not in ("copy", "mount"):
            raise LauncherError(f"bundle_mode must be 'copy' or 'mount', not {spec.bundle_mode!r}")
        name = spec.name or default_name(site)
        existing = self._find(name)
        if existing is not None:
            if not replace:
                raise LauncherError(
                    f"a container named {name} already exists ({existing.status}); "
                    f"`neurofed site down --name {name}` first, or give another --name"
                )
            existing.remove(force=True)
        try:
            self.client.images.get(spec.image)
        except docker.errors.ImageNotFound:
            raise LauncherError(
                f"image {spec.image} is not on this host; build it (`docker build -t {spec.image} .`) "
                "or load it (`docker load -i neurofed.tar`)"
            ) from None
        # Under /data/<site>, not /data itself: the trainer names the site after its folder, and
        # the split (splits.json) lists cases by that site id.
        data_dir = f"/data/{site}"
        mounts = [
            Mount(data_dir, str(data), type="bind", read_only=True),
            Mount("/state", f"{name}-state", type="volume"),
        ]
        if spec.bundle_mode == "mount":
            mounts.append(Mount("/bundle", str(bundle), type="bind", read_only=True))
        command = ["edge", "--bundle", "/bundle", "--data", data_dir, *spec.extra_args]
        labels = {ROLE_LABEL: "edge", SITE_LABEL: site, FEDERATION_LABEL: federation}
        kwargs: dict[str, Any] = {}
        if spec.network:
            kwargs["network_mode"] = spec.network
        if spec.healthcheck:
            kwargs["healthcheck"] = dict(spec.healthcheck)
        try:
            container = self.client.containers.create(
                spec.image,
                command=command,
                name=name,
                labels=labels,
                mounts=mounts,
                environment=dict(spec.environment),
                restart_policy={"Name": "unless-stopped"},
                init=True,  # a real PID 1: signals reach the agent, `down` stops it promptly
                device_requests=device_requests(spec.gpus) or None,
                detach=True,
                **kwargs,
            )
            if spec.bundle_mode == "copy":
                # /bundle exists in the image (empty, root-owned); the archive adds /bundle/* owned by the user.
                container.put_archive("/", bundle_archive(bundle))
            container.start()
        except docker.errors.APIError as exc:
            if "could not select device driver" in str(exc) and spec.gpus:
                raise LauncherError(
                    "the engine cannot give GPUs to containers: install the NVIDIA Container Toolkit "
                    "(nvidia-ctk runtime configure --runtime=docker) and restart Docker, or drop --gpus"
                ) from None
            raise LauncherError(f"docker refused to start {name}: {exc.explanation or exc}") from None
        return self.status(name)

    # -- status / logs / down -------------------------------------------------------------------
    def _find(self, name: str) -> Any:
        import docker.errors

        try:
            return self.client.containers.get(name)
        except docker.errors.NotFound:
            return None

    def _get(self, name: str) -> Any:
        c = self._find(name)
        if c is None:
            raise LauncherError(
                f"no container named {name}; `neurofed site status` lists the site containers"
            )
        return c

    def list(self) -> list[SiteStatus]:
        """Every container this launcher started (running or not)."""
        found = self.client.containers.list(all=True, filters={"label": f"{ROLE_LABEL}=edge"})
        return [self._status_of(c) for c in found]

    def status(self, name: str) -> SiteStatus:
        return self._status_of(self._get(name))

    def _status_of(self, c: Any) -> SiteStatus:
        c.reload()
        state = c.attrs.get("State", {})
        health = state.get("Health") or {}
        log = health.get("Log") or []
        return SiteStatus(
            name=c.name,
            site=c.labels.get(SITE_LABEL, "?"),
            status=state.get("Status", c.status),
            health=health.get("Status"),
            image=(c.image.tags or [c.image.short_id])[0] if c.image else "?",
            restarts=int(c.attrs.get("RestartCount", 0)),
            started_at=state.get("StartedAt", ""),
            health_log=(log[-1].get("Output", "").strip() if log else ""),
        )

    def logs(self, name: str, *, tail: int | str = 100, follow: bool = False) -> Iterator[bytes]:
        c = self._get(name)
        if follow:
            return c.logs(stream=True, follow=True, tail=tail)
        return iter([c.logs(tail=tail)])

    def down(self, name: str, *, purge: bool = False, timeout: int = 30) -> None:
        """Stop and remove the container (its bundle copy goes with it); ``purge`` also deletes
        the state volume (checkpoints, audit log)."""
        import docker.errors

        c = self._get(name)
        c.stop(timeout=timeout)
        c.remove()
        if purge:
            try:
                self.client.volumes.get(f"{name}-state").remove()
            except docker.errors.NotFound:
                pass


def connect(timeout: float = 60.0) -> Any:
    """A Docker client from the environment; EngineUnavailable with what to do when none answers."""
    try:
        import docker.errors

        import docker
    except ImportError:  # pragma: no cover - docker is a dependency of the kit
        raise LauncherError("the `docker` Python package is missing: pip install docker") from None
    where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        client = docker.from_env(timeout=int(timeout))
        client.ping()
    except docker.errors.DockerException as exc:
        reason = str(exc).split("(", 1)[0].strip() or exc.__class__.__name__
        raise EngineUnavailable(
            f"no Docker engine answers at {where} ({reason}); start it (`sudo systemctl start docker`), "
            "check you may use it (member of the `docker` group), or set DOCKER_HOST"
        ) from None
    return client
