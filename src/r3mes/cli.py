"""The ``r3mes`` command line. Each concern registers its own sub-commands."""

from __future__ import annotations

import argparse
import errno
import json
import sys
from collections.abc import Callable, Sequence

CommandRegistrar = Callable[[argparse._SubParsersAction], None]


def _cmd_info(args: argparse.Namespace) -> int:
    from r3mes import kernels
    from r3mes.utils.paths import r3mes_home

    data = kernels.info()
    data["home"] = str(r3mes_home(args.home))
    if args.model:
        from r3mes.core.checkpoint import describe_model

        data["model"] = describe_model(args.model)
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
        return 0
    print(f"r3mes {data['version']}")
    print(f"  data directory:   {data['home']}")
    print(f"  native module:    {'yes' if data['native'] else 'no'}")
    if data["native"]:
        print(f"  compiled SIMD:    {', '.join(data['compiled_simd_levels'])}")
        print(f"  supported SIMD:   {', '.join(data['supported_simd_levels'])}")
        print(f"  active SIMD:      {data['simd_level']}")
        feats = [k for k, v in sorted(data["cpu_features"].items()) if v]
        print(f"  CPU features:     {', '.join(feats) or 'none'}")
        print(f"  threads:          {data['num_threads']}")
        print(f"  weight layout:    {data['weight_layout']}")
        amx = "yes (prefill, decode batches of 3+ rows)" if data.get("amx") else "no"
        print(f"  AMX tiles:        {amx}")
    cuda = data["cuda"]
    print(f"  CUDA module:      {'built' if cuda['compiled'] else 'not built'}, "
          f"{cuda['device_count']} device(s)")
    if args.model:
        m = data["model"]
        print(f"model {m['path']}")
        print(f"  format:           {m['format']}")
        print(f"  LM head:          {m['head']}")
        print(f"  shape:            {m['layers']} layers, hidden {m['hidden_size']}, "
              f"vocabulary {m['vocab_size']}")
        if m["bytes_per_token"]:
            print(f"  read per token:   {m['bytes_per_token'] / 1e6:.0f} MB (ternary "
                  f"{m['ternary_bytes'] / 1e6:.0f} MB + head {m['head_bytes'] / 1e6:.0f} MB)")
    return 0


# `r3mes index ...` (searches run in loops, from scripts) needs none of the other groups,
# whose imports (torch among them) cost seconds: it registers its own group alone.
_SOLE_GROUP = {"index": "r3mes.rag.cli", "rag": "r3mes.rag.cli"}


def _registrars(only: str | None = None) -> list[CommandRegistrar]:
    """Sub-command groups contributed by the package's parts, imported lazily (``only``: the
    one module to import)."""
    import importlib

    found: list[CommandRegistrar] = []
    for module in (only,) if only else (
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


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The full parser, or (``argv`` naming a group in ``_SOLE_GROUP``) one with that group."""
    parser = argparse.ArgumentParser(prog="r3mes", description=__doc__)
    parser.add_argument("--version", action="version", version=f"r3mes {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="show version, data directory, kernels, CPU features, "
                          "threads, CUDA")
    info.add_argument("--home", help="data directory (default $R3MES_HOME or ~/.r3mes)")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.add_argument("--model", help="also describe this model directory (format, LM head "
                      "kind, bytes read per token), from its config alone")
    info.set_defaults(func=_cmd_info)
    first = next((a for a in (argv or ()) if not a.startswith("-")), None)
    for register in _registrars(_SOLE_GROUP.get(first or "")):
        register(sub)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("r3mes")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        # A full disk (or quota) is the user's to fix, not a bug: one line, no traceback.
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        from r3mes.utils.diskspace import disk_full_message

        message = disk_full_message(exc)
        if getattr(args, "json", False):
            print(json.dumps({"error": message, "type": "DiskFullError"}))
        else:
            print(f"error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
