"""The coordinator's resume state: one atomic snapshot per completed round.

``STATE/snapshot.safetensors`` holds everything a restarted coordinator needs, in one file written
to a temporary name, fsynced and renamed over the old one (POSIX rename is atomic), so a crash at
any instant leaves either the previous round's snapshot or this one, never a mix:

- tensors ``global/<name>``: the global model after ``round``;
- tensors ``strategy/<name>``: the strategy's persistent tensors (FedAdam/FedYogi moments);
- tensors ``sent/<name>`` (``--compression int8|int8-topk``): the model the sites reconstructed
  from the last MODEL, against which the next one is a delta;
- metadata ``neurofed.snapshot``: JSON with the round, federation, strategy settings and counters,
  the roster digest, the model config and the rounds already registered.

Beside it, ``STATE/rounds/global-rNNNN.safetensors`` is each round's model as a normal neurofed
weights file (config in the metadata, readable by ``neurofed.models.checkpoint.load_weights``) for the
registry, and ``STATE/registered.json`` is the registration ledger, written by the background
registration worker after each successful registration.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from neurofed.coordinator.errors import StateError

SNAPSHOT = "snapshot.safetensors"
LEDGER = "registered.json"
ROSTERS = "rosters-taken.txt"  # digests of rosters taken live, one a line
META_KEY = "neurofed.snapshot"
# the same keys as models.checkpoint, so round files are ordinary neurofed weights files
CONFIG_KEY = "neurofed.model_config"
FORMAT_KEY = "neurofed.format"
FORMAT = "neurofed-weights-v1"
# How often a coordinator whose state disk is full tries to save again
DISK_FULL_RETRY_S = 2.0

log = logging.getLogger(__name__)
T = TypeVar("T")


def disk_full(exc: BaseException) -> bool:
    """The write failed for want of space (ENOSPC, or a quota: EDQUOT), not for a bad path.
    safetensors reports it as a ``SafetensorError`` carrying the OS error's text and number."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(exc)
    return type(exc).__name__ == "SafetensorError" and any(
        f"os error {n})" in text for n in (errno.ENOSPC, errno.EDQUOT)
    )


def append_whole(path: Path, data: bytes) -> None:
    """Append ``data`` to ``path`` whole or not at all: a write cut short (a full disk) is cut
    back off, so no half line is left for the next append to run into."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        start = os.fstat(fd).st_size
        try:
            done = os.write(fd, data)
            if done < len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        except OSError:
            os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)


def until_saved(
    write: Callable[[], T],
    what: str,
    folder: Path,
    *,
    interval: float = DISK_FULL_RETRY_S,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run ``write`` until it is not refused for want of space, and return what it returned.

    Why wait rather than fail: a full state disk is an operator's problem that does not damage
    anything (every write here is atomic, so the last saved round is whole), and the coordinator
    must not announce a round it could not save. Stopping would lose the round the sites just
    trained; waiting keeps it in memory until the operator frees space, and says so once, with
    the folder to clean. Any other error is raised at once. SIGTERM still stops the wait."""
    since: float | None = None
    while True:
        try:
            out = write()
        except Exception as exc:
            if not disk_full(exc):
                raise
            if since is None:
                since = time.monotonic()
                log.error(
                    "state disk full: cannot save %s in %s (%s); free space there: the coordinator "
                    "waits with it in memory, announces nothing new and loses nothing (trying "
                    "again every %.0f s)",
                    what,
                    folder,
                    getattr(exc, "strerror", None) or exc,
                    interval,
                )
            sleep(interval)
            continue
        if since is not None:
            log.warning(
                "state disk has space again: %s saved after %.0f s of a full disk",
                what,
                time.monotonic() - since,
            )
        return out


@dataclass
class Snapshot:
    """What survives a coordinator restart."""

    round: int
    federation: str
    weights: dict[str, np.ndarray]
    model_config: dict[str, Any]
    strategy_meta: dict[str, Any] = field(default_factory=dict)
    strategy_tensors: dict[str, np.ndarray] = field(default_factory=dict)
    roster_digest: str = ""
    registered: list[int] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    site_optimizer: dict[str, np.ndarray] = field(default_factory=dict)  # continue-global
    # int8 / int8-topk: the model the sites reconstructed from the last MODEL sent (tensors
    # ``sent/<name>``); the next broadcast is a delta against it
    reconstructed: dict[str, np.ndarray] = field(default_factory=dict)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save_tensors(path: Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> Path:
    """safetensors write to a temp file in the same folder, fsync, rename: all or nothing."""
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: np.asarray(v, order="C") for k, v in tensors.items()}, tmp, metadata=dict(metadata))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class StateStore:
    """Reads and writes one coordinator's state folder."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    @property
    def snapshot_path(self) -> Path:
        return self.root / SNAPSHOT

    def round_weights_path(self, round: int) -> Path:
        return self.root / "rounds" / f"global-r{round:04d}.safetensors"

    def exists(self) -> bool:
        return self.snapshot_path.is_file()

    @property
    def run_path(self) -> Path:
        return self.root / "run.json"

    @property
    def seen_path(self) -> Path:
        """Ids of the messages taken in this run (the replay window across restarts)."""
        return self.root / "seen-messages.log"

    def run_id(self) -> str:
        """This state's federation run id, created with the state (its start time and 64 random
        bits) and kept on resume: every message of the run is bound to it, so nothing captured
        in another run (another ``--state``) is taken in this one."""
        from neurofed.wire.envelope import RUN_RE, new_run_id

        try:
            run = json.loads(self.run_path.read_text()).get("run", "")
            if RUN_RE.match(run):
                return run
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            raise StateError(
                f"{self.run_path}: unreadable ({exc}); it names this state's federation run"
            ) from None
        run = new_run_id()
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(
            self.run_path, {"run": run, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        )
        return run

    def write_round_weights(
        self, round: int, weights: Mapping[str, np.ndarray], model_config: Mapping[str, Any]
    ) -> Path:
        meta = {
            FORMAT_KEY: FORMAT,
            CONFIG_KEY: json.dumps(dict(model_config), sort_keys=True),
            "neurofed.round": str(round),
        }
        return atomic_save_tensors(self.round_weights_path(round), weights, meta)

    def save(self, snap: Snapshot) -> Path:
        """Persist ``snap`` atomically (the round's weights file first, then the snapshot)."""
        self.write_round_weights(snap.round, snap.weights, snap.model_config)
        tensors = {f"global/{k}": v for k, v in snap.weights.items()}
        tensors.update({f"strategy/{k}": v for k, v in snap.strategy_tensors.items()})
        tensors.update({f"site-optimizer/{k}": v for k, v in snap.site_optimizer.items()})
        tensors.update({f"sent/{k}": v for k, v in snap.reconstructed.items()})
        meta_json = {
            "round": snap.round,
            "federation": snap.federation,
            "model_config": snap.model_config,
            "strategy": snap.strategy_meta,
            "roster_digest": snap.roster_digest,
            "registered": sorted(set(snap.registered) | set(self.registered())),
            "extra": snap.extra,
            "saved_at": time.time(),
        }
        return atomic_save_tensors(self.snapshot_path, tensors, {META_KEY: json.dumps(meta_json)})

    def load(self, *, federation: str | None = None, roster_digest: str | None = None) -> Snapshot:
        """Read the snapshot; raise ``StateError`` if it is corrupt or for another federation."""
        from safetensors import SafetensorError, safe_open

        path = self.snapshot_path
        if not path.is_file():
            raise StateError(f"{path}: no coordinator snapshot here (nothing to resume)")
        try:
            with safe_open(str(path), framework="numpy") as fh:
                meta_raw = (fh.metadata() or {}).get(META_KEY)
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
        except (SafetensorError, OSError, ValueError) as exc:
            raise StateError(
                f"{path}: corrupt snapshot ({exc}); restore it from backup or start a fresh --state folder"
            ) from None
        if not meta_raw:
            raise StateError(f"{path}: not a neurofed coordinator snapshot (no {META_KEY} metadata)")
        meta = json.loads(meta_raw)
        if federation is not None and meta.get("federation") != federation:
            raise StateError(
                f"{path}: snapshot belongs to federation {meta.get('federation')!r}, not {federation!r}; "
                "use another --state folder"
            )
        if roster_digest and meta.get("roster_digest") and meta["roster_digest"] != roster_digest:
            raise StateError(
                f"{path}: the federation roster changed since this snapshot (digest "
                f"{meta['roster_digest'][:12]} != {roster_digest[:12]}); re-provisioning needs a fresh --state"
            )
        return Snapshot(
            round=int(meta["round"]),
            federation=meta["federation"],
            weights={k[7:]: v for k, v in tensors.items() if k.startswith("global/")},
            model_config=meta["model_config"],
            strategy_meta=meta.get("strategy", {}),
            strategy_tensors={k[9:]: v for k, v in tensors.items() if k.startswith("strategy/")},
            roster_digest=meta.get("roster_digest", ""),
            registered=sorted(set(meta.get("registered", [])) | set(self.registered())),
            extra=meta.get("extra", {}),
            site_optimizer={k[15:]: v for k, v in tensors.items() if k.startswith("site-optimizer/")},
            reconstructed={k[5:]: v for k, v in tensors.items() if k.startswith("sent/")},
        )

    # -- registration ledger (written by the registration worker) -------------------------------
    def rosters_taken(self) -> list[str]:
        """SHA-256 digests of the rosters this state took live (newer versions of its own)."""
        try:
            return (self.root / ROSTERS).read_text().split()
        except OSError:
            return []

    def take_roster(self, digest: str) -> None:
        """Remember a roster taken live, so a restart with it in the bundle resumes this state."""
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ROSTERS).open("a") as fh:
            fh.write(digest + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def registered(self) -> list[int]:
        path = self.root / LEDGER
        if not path.is_file():
            return []
        try:
            return sorted(int(r) for r in json.loads(path.read_text()).get("rounds", []))
        except (ValueError, AttributeError):
            raise StateError(
                f"{path}: corrupt registration ledger; delete it to re-register (idempotent)"
            ) from None

    def _ledger(self) -> dict[str, Any]:
        path = self.root / LEDGER
        if not path.is_file():
            return {"rounds": [], "versions": {}, "evaluated": []}
        try:
            data = json.loads(path.read_text())
        except ValueError:
            raise StateError(
                f"{path}: corrupt registration ledger; delete it to re-register (idempotent)"
            ) from None
        data.setdefault("versions", {})
        data.setdefault("evaluated", [])
        return data

    def mark_registered(self, rounds: Iterable[int], versions: Mapping[int, Any] | None = None) -> None:
        data = self._ledger()
        data["rounds"] = sorted(set(data.get("rounds", [])) | {int(r) for r in rounds})
        data["versions"].update({str(k): v for k, v in (versions or {}).items()})
        atomic_write_json(self.root / LEDGER, data)

    def evaluated(self) -> list[int]:
        """Rounds whose sites' evaluation reached the registry (``record_evaluation``)."""
        return sorted(int(r) for r in self._ledger()["evaluated"])

    def mark_evaluated(self, round: int) -> None:
        data = self._ledger()
        data["evaluated"] = sorted(set(data["evaluated"]) | {int(round)})
        atomic_write_json(self.root / LEDGER, data)
