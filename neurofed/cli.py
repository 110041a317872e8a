"""The single ``neurofed`` command. Sub-commands are discovered from ``neurofed.commands``."""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from collections.abc import Sequence

from neurofed import __version__, commands
from neurofed.config import ConfigError, apply_defaults, load_toml

DESCRIPTION = """\
neurofed trains a brain-tumour segmentation 3D-UNet across hospitals without moving a scan.

Typical flow:
  neurofed synth --out data --sites 3            # synthetic institutions (or use real BraTS)
  neurofed provision --federation demo --sites site-01,site-02,site-03 --out bundles
  neurofed broker --bundle bundles/broker        # Mosquitto with mTLS + ACLs
  neurofed coordinator --bundle bundles/coordinator --rounds 5
  neurofed edge --bundle bundles/site-01 --data data/site-01
  neurofed infer scan_flair.nii.gz --model models:/demo-unet@champion -o mask.nii.gz

Or all of it on one machine: `neurofed demo`.
Every option can also come from NEUROFED_<OPTION> or a TOML file given with --config.
"""


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog="neurofed", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"neurofed {__version__}")
    parser.add_argument("--config", help="TOML file with option values (flags override it)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers: dict[str, argparse.ArgumentParser] = {}
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"neurofed.commands.{info.name}")
        p = module.register(sub)
        subparsers[p.prog.split()[-1]] = p
    return parser, subparsers


def main(argv: Sequence[str] | None = None) -> int:
    parser, subparsers = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    try:
        file_cfg = load_toml(args.config) if args.config else {}
        apply_defaults(subparsers[args.command], args.command, file_cfg)
        args = parser.parse_args(argv)
    except ConfigError as exc:
        print(f"neurofed: configuration error: {exc}", file=sys.stderr)
        return 2
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from neurofed.allocator import tune_malloc

    tune_malloc()  # model-sized buffers and activations off fresh mmaps (see neurofed/allocator.py)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("neurofed: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one place turns library errors into a message, not a traceback
        from neurofed.errors import format_user_error

        msg = format_user_error(exc)
        if msg is None or args.verbose >= 2:
            raise
        print(f"neurofed {args.command}: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
