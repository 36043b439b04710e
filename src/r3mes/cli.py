"""The ``r3mes`` command line. Each concern registers its own sub-commands."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

CommandRegistrar = Callable[[argparse._SubParsersAction], None]


def _cmd_info(args: argparse.Namespace) -> int:
    from r3mes import kernels

    data = kernels.info()
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
        return 0
    print(f"r3mes {data['version']}")
    print(f"  native module:    {'yes' if data['native'] else 'no'}")
    if data["native"]:
        print(f"  compiled SIMD:    {', '.join(data['compiled_simd_levels'])}")
        print(f"  supported SIMD:   {', '.join(data['supported_simd_levels'])}")
        print(f"  active SIMD:      {data['simd_level']}")
        feats = [k for k, v in sorted(data["cpu_features"].items()) if v]
        print(f"  CPU features:     {', '.join(feats) or 'none'}")
        print(f"  threads:          {data['num_threads']}")
        print(f"  weight layout:    {data['weight_layout']}")
        print(f"  AMX prefill:      {'yes' if data.get('amx') else 'no'}")
    cuda = data["cuda"]
    print(f"  CUDA module:      {'built' if cuda['compiled'] else 'not built'}, "
          f"{cuda['device_count']} device(s)")
    return 0


def _registrars() -> list[CommandRegistrar]:
    """Sub-command groups contributed by the package's parts, imported lazily."""
    import importlib

    found: list[CommandRegistrar] = []
    for module in (
        "r3mes.cache.cli",
        "r3mes.router.cli",
        "r3mes.rag.cli",
        "r3mes.serving.cli",
        "r3mes.core.cli",
        "r3mes.kernels.cli",
    ):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            # A part that is not installed (or not written yet) contributes no commands;
            # any other missing module is a real error.
            if exc.name is not None and module.startswith(exc.name):
                continue
            raise
        found.append(mod.register)
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="r3mes", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="show version, kernels, CPU features, threads, CUDA")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=_cmd_info)
    for register in _registrars():
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
