"""Run one fuzz target under atheris (libFuzzer): ``python -m fuzz.run TARGET [libFuzzer args]``.

``scripts/fuzz`` is the front end (seeds, artifacts, summary); this module only
instruments p2psync, then hands the process to atheris, which never returns. The
p2psync modules (and the targets) are imported inside ``instrument_imports`` so
libFuzzer sees their branches (``cov:``/``ft:``).
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["p2psync", "fuzz.targets"]):
    from fuzz.targets import TARGETS, run_one


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        print(f"usage: python -m fuzz.run TARGET [libFuzzer options]; targets: {' '.join(TARGETS)}")
        raise SystemExit(2)
    name = sys.argv.pop(1)

    def one_input(data: bytes) -> None:
        run_one(name, data)

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
