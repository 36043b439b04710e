"""Fail when an ISA-flagged object file defines a symbol outside its own namespace.

Kernel variants live in files named *_avx2.cpp, *_avx512.cpp, *_avx512vnni.cpp and *_amx.cpp,
compiled for that instruction set only (cmake/R3mesSimd.cmake). Any weak or global symbol
such a file defines outside ``r3mes::isa_<level>`` (an inline function from a header, a
std::vector member, pybind11 code) may be the copy the linker keeps for every caller, and
baseline code would then run AVX-512 instructions and die with SIGILL on an AVX2-only CPU.

    python scripts/check_isa_symbols.py [BUILD_DIR ...]     # default: every build/* tree

Exit status 1 lists the offending symbols; 2 when no ISA object was found.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ISA_OBJECT = re.compile(r"_(avx2|avx512|avx512vnni|amx)\.cpp\.o$")
# nm types of defined symbols with external linkage (global or weak, code or data).
EXTERNAL = set("TWVDBRGSuvi")


def isa_objects(build_dirs: list[Path]) -> list[tuple[Path, str]]:
    """(object, level) of every ISA object built from a source that exists and is not newer
    than the object (a stale object of an edited file is not this tree's code)."""
    found = []
    for build in build_dirs:
        for obj in build.rglob("*.cpp.o"):
            m = ISA_OBJECT.search(obj.name)
            parts = obj.parts
            if not m or "csrc" not in parts:
                continue
            src = ROOT.joinpath(*parts[parts.index("csrc"):])
            src = src.with_name(src.name[: -len(".o")])
            if src.is_file() and src.stat().st_mtime <= obj.stat().st_mtime:
                found.append((obj, m.group(1)))
    return found


def offending_symbols(obj: Path, level: str) -> list[str]:
    out = subprocess.run(["nm", "-C", "--defined-only", str(obj)], capture_output=True,
                         text=True, check=True).stdout
    bad = []
    for line in out.splitlines():
        fields = line.split(maxsplit=2)
        if len(fields) == 3 and fields[1] in EXTERNAL:
            if not fields[2].startswith(f"r3mes::isa_{level}::"):
                bad.append(f"{fields[1]} {fields[2]}")
    return bad


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if shutil.which("nm") is None:
        print("nm not found (binutils)", file=sys.stderr)
        return 2
    dirs = [Path(a) for a in args] or sorted(p for p in (ROOT / "build").glob("*") if p.is_dir())
    objects = isa_objects(dirs)
    if not objects:
        print(f"no ISA object files under {', '.join(map(str, dirs)) or 'build/'}",
              file=sys.stderr)
        return 2
    failed = 0
    for obj, level in objects:
        bad = offending_symbols(obj, level)
        if bad:
            failed += 1
            print(f"{obj}: {len(bad)} symbol(s) outside r3mes::isa_{level}::")
            for sym in bad[:20]:
                print(f"  {sym}")
    print(f"{len(objects)} ISA object(s) checked, {failed} with symbols outside their namespace")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
