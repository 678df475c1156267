"""Fuzz campaigns: ``scripts/fuzz TARGET|all [--runs N] ...`` (``scripts/fuzz`` sets up
the venv and atheris, then runs this module).

For each target, one after the other (one process at a time): write its seeds
(``fuzz/corpus.py``) into the corpus folder, run ``fuzz/run.py`` under libFuzzer
for ``--runs`` inputs, and report inputs run, exec/s, the final coverage
(libFuzzer's ``cov:`` edges and ``ft:`` features) and crashes. libFuzzer keeps the
inputs that found new coverage in the corpus folder (so a later campaign starts
from there) and writes a crashing input to ``fuzz/crashes/TARGET/`` (``crash-*``,
``timeout-*``, ``oom-*``); its log goes to ``fuzz/logs/TARGET.log``. ``--cover``
then replays each corpus to list the decoder lines no input ran (``fuzz/cover.py``).
Reproduce a crash with ``python -m fuzz.run TARGET fuzz/crashes/TARGET/crash-...``.

Exit status: 0 no crash, 1 a target crashed, 2 a usage error.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fuzz import corpus, cover
from fuzz.targets import TARGETS

ROOT = Path(__file__).resolve().parent.parent
_DONE = re.compile(r"^#(\d+)\s+DONE\s+cov: (\d+) ft: (\d+)", re.M)
_STATUS = re.compile(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+)", re.M)
_STAT = re.compile(r"^stat::(\w+):\s+(\d+)", re.M)


@dataclass
class Result:
    target: str
    runs: int
    seconds: float
    exec_per_s: int
    cov: int
    ft: int
    crashes: list[Path]
    returncode: int

    def line(self) -> str:
        found = ", ".join(str(p) for p in self.crashes) if self.crashes else "none"
        return (
            f"{self.target}: {self.runs} inputs in {self.seconds:.0f} s "
            f"({self.exec_per_s} exec/s), cov {self.cov} ft {self.ft}, crashes: {found}"
        )


def campaign(
    name: str,
    runs: int,
    corpus_root: Path,
    crash_root: Path,
    log_root: Path,
    extra: list[str],
) -> Result:
    folder = corpus_root / name
    corpus.write(corpus_root, [name])
    crashes = crash_root / name
    crashes.mkdir(parents=True, exist_ok=True)
    log_root.mkdir(parents=True, exist_ok=True)
    before = set(crashes.iterdir())
    command = [
        sys.executable,
        "-m",
        "fuzz.run",
        name,
        f"-runs={runs}",
        f"-artifact_prefix={crashes}/",
        "-timeout=10",  # seconds for one input: longer is a hang
        "-rss_limit_mb=2048",
        "-print_final_stats=1",
        *extra,
        str(folder),
    ]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    log = log_root / f"{name}.log"
    started = time.monotonic()
    with log.open("w") as out:
        done = subprocess.run(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT, check=False
        )
    seconds = time.monotonic() - started
    text = log.read_text(errors="replace")
    stats = {k: int(v) for k, v in _STAT.findall(text)}
    status = _DONE.findall(text) or _STATUS.findall(text)
    executed, cov, ft = (int(x) for x in status[-1]) if status else (0, 0, 0)
    executed = stats.get("number_of_executed_units", executed)
    found = sorted(set(crashes.iterdir()) - before)
    result = Result(
        name,
        executed,
        seconds,
        stats.get("average_exec_per_sec") or (int(executed / seconds) if seconds else 0),
        cov,
        ft,
        found,
        done.returncode,
    )
    if done.returncode != 0 and not found:
        # a crash libFuzzer could not save (or atheris failed to start): say so
        tail = "\n".join(text.splitlines()[-30:])
        print(f"{name}: libFuzzer exited {done.returncode}; the end of {log}:\n{tail}")
    elif found:
        trace = text[text.find("=== Uncaught Python exception") :] if "Uncaught" in text else ""
        print("\n".join(trace.splitlines()[:40]))
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scripts/fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("target", help=f"one of: all, {', '.join(TARGETS)}")
    parser.add_argument("--runs", type=int, default=100_000, help="inputs per target")
    parser.add_argument("--corpus", type=Path, default=ROOT / "fuzz" / "corpus")
    parser.add_argument("--crashes", type=Path, default=ROOT / "fuzz" / "crashes")
    parser.add_argument("--logs", type=Path, default=ROOT / "fuzz" / "logs")
    parser.add_argument("--seed", type=int, help="libFuzzer's random seed (default: random)")
    parser.add_argument("--max-len", type=int, help="longest input libFuzzer tries")
    parser.add_argument(
        "--cover",
        action="store_true",
        help="then replay each corpus and print the decoder lines it ran (fuzz/cover.py)",
    )
    args = parser.parse_args(argv)
    if args.target != "all" and args.target not in TARGETS:
        parser.error(f"unknown target {args.target!r}; one of: all, {', '.join(TARGETS)}")
    extra = []
    if args.seed is not None:
        extra.append(f"-seed={args.seed}")
    if args.max_len is not None:
        extra.append(f"-max_len={args.max_len}")
    names = list(TARGETS) if args.target == "all" else [args.target]
    results = []
    for name in names:
        result = campaign(name, args.runs, args.corpus, args.crashes, args.logs, extra)
        print(result.line(), flush=True)
        results.append(result)
    if args.cover:
        for name in names:
            print("\n".join(cover.report(name, args.corpus / name)), flush=True)
    failed = [r for r in results if r.crashes or r.returncode != 0]
    if len(results) > 1:
        total = sum(r.runs for r in results)
        print(f"all: {total} inputs over {len(results)} targets, {len(failed)} crashed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
