"""Run import-linter over the installed layout (``neurofed.<room>``) of this repository.

The rooms are top-level folders that install as ``neurofed.<room>`` (setuptools package-dir); the
``neurofed/`` folder holds a symbolic link to each, so a plain ``lint-imports`` in the repository
root sees the same package. This script builds a throw-away view of that layout (links, or copies
with ``copy=True`` so that a test can plant a module in a room) and runs ``lint-imports`` there
against pyproject.toml's contracts, whatever the current folder.

    python scripts/lint_imports.py        # exit status 0 when every contract is kept
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parent.parent


def build_view(dest: Path, *, copy: bool = False) -> Path:
    """``dest/neurofed`` laid out as installed: the package's files plus the mapped rooms
    (symbolic links; copies with ``copy=True``, so that a test can plant a module in a room)."""
    conf = tomllib.loads((REPO / "pyproject.toml").read_text())
    mapping = conf["tool"]["setuptools"].get("package-dir", {})
    pkg = dest / "neurofed"
    pkg.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__")

    def place(src: Path, dst: Path) -> None:
        if not copy:
            dst.symlink_to(src, target_is_directory=src.is_dir())
        elif src.is_dir():
            shutil.copytree(src, dst, ignore=ignore)
        else:
            shutil.copy2(src, dst)

    for entry in (REPO / "neurofed").iterdir():
        if entry.name != "__pycache__":
            place(entry, pkg / entry.name)
    for name, folder in mapping.items():
        parts = name.split(".")
        if parts[0] == "neurofed" and len(parts) == 2 and not (pkg / parts[1]).exists():
            place(REPO / folder, pkg / parts[1])
    return pkg


def run(view_root: Path, *args: str) -> subprocess.CompletedProcess:
    """``lint-imports`` over the view at ``view_root`` (its output captured)."""
    exe = shutil.which("lint-imports", path=os.path.dirname(sys.executable)) or shutil.which("lint-imports")
    if exe is None:
        raise FileNotFoundError("lint-imports not found: install the dev extra (pip install -e '.[dev]')")
    env = dict(os.environ, PYTHONPATH=str(view_root), PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run(
        [exe, "--no-cache", str(REPO / "pyproject.toml"), *args],
        cwd=view_root,
        env=env,
        capture_output=True,
        text=True,
    )


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="nf-layers-") as tmp:
        build_view(Path(tmp))
        try:
            done = run(Path(tmp), *sys.argv[1:])
        except FileNotFoundError as exc:
            print(exc, file=sys.stderr)
            return 2
        sys.stdout.write(done.stdout)
        sys.stderr.write(done.stderr)
        return done.returncode


if __name__ == "__main__":
    sys.exit(main())
