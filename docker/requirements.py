"""Print the kit's runtime requirements from pyproject.toml, one per line.

Why not ``pip install .``: the image installs the dependencies in their own layer before the
source is copied, so a code change rebuilds only the small project layer. Reading pyproject here
keeps one list of dependencies (no requirements.txt to drift). Standard library only: it runs in a
bare base image before anything is installed (Python 3.11+, for tomllib).

Usage: python3 requirements.py PYPROJECT [--extra cpu|gpu] [--only NAME | --without NAME]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import tomllib

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def requirement_name(spec: str) -> str:
    """The normalised distribution name of a requirement string ("Torch>=2" -> "torch")."""
    match = _NAME.match(spec)
    if not match:
        raise ValueError(f"cannot read a package name from requirement {spec!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    """The project's dependencies plus the named optional extras, in file order."""
    data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    project = data["project"]
    reqs = list(project.get("dependencies", []))
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            raise SystemExit(
                f"requirements.py: {pyproject} has no extra {extra!r}; known: {sorted(optional)}"
            )
        reqs.extend(optional[extra])
    return reqs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("pyproject", type=Path)
    parser.add_argument("--extra", action="append", default=[], help="optional extra to include (repeatable)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--only", help="print only this package's requirement")
    group.add_argument("--without", action="append", default=[], help="leave this package out (repeatable)")
    args = parser.parse_args(argv)
    reqs = requirements(args.pyproject, args.extra)
    if args.only:
        reqs = [r for r in reqs if requirement_name(r) == requirement_name(args.only)]
        if not reqs:
            raise SystemExit(f"requirements.py: {args.only!r} is not a requirement in {args.pyproject}")
    skip = {requirement_name(n) for n in args.without}
    sys.stdout.write("".join(f"{r}\n" for r in reqs if requirement_name(r) not in skip))
    return 0


if __name__ == "__main__":
    sys.exit(main())
