"""`python -m bench <name> [options]`, `python -m bench all`, `python -m bench --list`."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import time

from bench import BENCHMARKS


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _run(name: str, argv: list[str]) -> int:
    module, _ = BENCHMARKS[name]
    started = time.perf_counter()
    status: int = importlib.import_module(module).main(argv)
    print(f"\n[{name}] exit {status} after {time.perf_counter() - started:.1f}s", file=sys.stderr)
    return status


def main(argv: list[str]) -> int:
    """Dispatch to one benchmark's main(), or run every available one with defaults."""
    if not argv or argv[0] in {"-h", "--help", "--list"}:
        print(__doc__)
        for name, (module, about) in BENCHMARKS.items():
            mark = "" if _available(module) else "  (not written yet)"
            print(f"  {name:<15} {about}{mark}")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name == "all":
        if rest:
            print(
                "`all` runs every benchmark with its defaults and takes no options", file=sys.stderr
            )
            return 2
        present = [n for n, (module, _) in BENCHMARKS.items() if _available(module)]
        missing = sorted(set(BENCHMARKS) - set(present))
        if missing:
            print(f"not written yet, skipped: {', '.join(missing)}", file=sys.stderr)
        failed = [n for n in present if _run(n, []) != 0]
        if failed:
            print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1 if failed else 0
    if name not in BENCHMARKS:
        print(f"unknown benchmark {name!r}; one of: {', '.join(BENCHMARKS)}, all", file=sys.stderr)
        return 2
    if not _available(BENCHMARKS[name][0]):
        print(f"benchmark {name!r} is not written yet ({BENCHMARKS[name][0]})", file=sys.stderr)
        return 2
    return _run(name, rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
