"""One ``splits.json`` per federation: train / val / test case ids per site.

Every arm (centralized, single-site, federated) reads the same file, so every model is scored on
the same held-out cases, drawn from every site. The split is a pure function of the case list and
a seed, and each site's split depends only on its own cases: a hospital that recomputes it from
its own folder gets the same ids as the coordinator.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from neurofed.edge_node.data import SITES_CSV, Case, group_by_site
from neurofed.edge_node.errors import SplitError

SPLITS_JSON = "splits.json"
SPLIT_NAMES = ("train", "val", "test")

log = logging.getLogger(__name__)


def _site_seed(seed: int, site: str) -> list[int]:
    return [int(seed), int(hashlib.sha256(site.encode()).hexdigest()[:8], 16)]


def split_counts(n: int, test_frac: float, val_frac: float) -> tuple[int, int, int]:
    """(train, val, test) sizes: at least one test and one train case when a site has two or more."""
    if n <= 1:
        return n, 0, 0
    n_test = max(1, int(round(n * test_frac)))
    rest = n - n_test
    n_val = max(1, int(round(n * val_frac))) if rest >= 3 else 0
    return rest - n_val, n_val, n_test


def make_splits(
    cases: Sequence[Case], *, seed: int = 0, test_frac: float = 0.2, val_frac: float = 0.1
) -> dict[str, Any]:
    """Deterministic per-site split of ``cases``."""
    sites: dict[str, dict[str, list[str]]] = {}
    for site, site_cases in group_by_site(cases).items():
        ids = sorted(c.case_id for c in site_cases)
        order = np.random.default_rng(_site_seed(seed, site)).permutation(len(ids))
        shuffled = [ids[i] for i in order]
        n_train, n_val, _ = split_counts(len(ids), test_frac, val_frac)
        sites[site] = {
            "train": sorted(shuffled[:n_train]),
            "val": sorted(shuffled[n_train : n_train + n_val]),
            "test": sorted(shuffled[n_train + n_val :]),
        }
    return {"seed": seed, "test_frac": test_frac, "val_frac": val_frac, "sites": sites}


def write_splits(path: str | os.PathLike[str], splits: dict[str, Any]) -> Path:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(splits, fh, indent=2, sort_keys=True)
        fh.write("\n")
    os.replace(tmp, path)
    return path


def read_splits(path: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        sites = data["sites"]
        for site, parts in sites.items():
            for name in SPLIT_NAMES:
                if not isinstance(parts.get(name, []), list):
                    raise TypeError(f"site {site}: {name} is not a list")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SplitError(f"{path}: not a valid splits file ({exc}); delete it to recreate it") from None
    return data


def check_splits(splits: dict[str, Any], cases: Sequence[Case], where: str) -> None:
    """Every case on disk is in exactly one split of its own site, and nothing else is listed."""
    known = {c.case_id: c.site for c in cases}
    listed: dict[str, str] = {}
    for site, parts in splits["sites"].items():
        for name in SPLIT_NAMES:
            for cid in parts.get(name, []):
                if cid in listed:
                    raise SplitError(f"{where}: case {cid} is listed twice ({listed[cid]} and {site}/{name})")
                listed[cid] = f"{site}/{name}"
    missing = sorted(set(known) - set(listed))
    if missing:
        raise SplitError(
            f"{where}: {len(missing)} case(s) on disk are in no split (e.g. {', '.join(missing[:5])}); "
            "the data changed since the splits were written: delete splits.json to recreate it, "
            "knowing that earlier results used the old split"
        )


def splits_path_for(data_path: Path) -> Path:
    """Where the splits file of ``data_path`` lives: next to ``sites.csv`` (the federation root),
    or inside a lone site folder."""
    data_path = Path(data_path)
    if data_path.is_file():
        return data_path.parent / SPLITS_JSON
    if (data_path / SITES_CSV).is_file() or (data_path / SPLITS_JSON).is_file():
        return data_path / SPLITS_JSON
    if (data_path.parent / SITES_CSV).is_file() or (data_path.parent / SPLITS_JSON).is_file():
        return data_path.parent / SPLITS_JSON
    return data_path / SPLITS_JSON


def load_or_create_splits(
    path: str | os.PathLike[str], cases: Sequence[Case], *, seed: int = 0, check: bool = True
) -> dict[str, Any]:
    """Read ``path`` if it exists (checking it covers ``cases``), else make and write it."""
    path = Path(path)
    if path.is_file():
        splits = read_splits(path)
        if check:
            present = {c.site for c in cases}
            check_splits(splits, [c for c in cases if c.site in present], str(path))
        return splits
    splits = make_splits(cases, seed=seed)
    try:
        write_splits(path, splits)
    except OSError as exc:
        # A hospital mounts its scans read-only; the split is deterministic from the seed, so the
        # same one comes back next time without a file.
        log.warning("could not write %s (%s); using the seed-%d split without saving it", path, exc, seed)
    return splits


def select(
    cases: Sequence[Case], splits: dict[str, Any], split: str, sites: Sequence[str] | None = None
) -> list[Case]:
    """Cases of ``split`` (train/val/test) at ``sites`` (all sites if None), in (site, case) order."""
    if split not in SPLIT_NAMES:
        raise SplitError(f"unknown split {split!r}; choose one of {', '.join(SPLIT_NAMES)}")
    wanted: set[str] = set()
    for site, parts in splits["sites"].items():
        if sites is None or site in sites:
            wanted.update(parts.get(split, []))
    return [c for c in cases if c.case_id in wanted and (sites is None or c.site in sites)]
