"""Line coverage of the decoders by a corpus: ``python -m fuzz.cover CORPUS [TARGET...]``
(``scripts/fuzz --cover`` runs it after the campaigns).

libFuzzer's ``cov:`` counts edges in every instrumented module, which says how
far a campaign got but not *where*. This replays each target's corpus folder
(seeds and everything libFuzzer kept) under a line tracer, without atheris, and
prints per decoder function the lines run out of its lines, and the lines never
run: what no input reached. Decoder functions are those listed in
:data:`DECODERS` and everything they call in the same module (private helpers).
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from fuzz.targets import TARGETS, run_one
from p2psync import pairing
from p2psync.core import (
    bundle,
    canonical,
    entry,
    envelope,
    frames,
    handshake,
    messages,
    noise,
    policy,
    receipt,
    relaywire,
    rules,
)
from p2psync.net import adverts

#: The decoders each target means to reach (their helpers are counted with them).
DECODERS: dict[str, tuple[Callable[..., object], ...]] = {
    "frames": (frames.FrameReader.next_frame, frames.Opener.open),
    "handshake": (
        handshake.Handshake.receive,
        handshake.Handshake._check_payload,
        noise.HandshakeState.read_message,
    ),
    "messages": (messages.decode,),
    "entry": (entry.decode_wire, entry.decode_stored, entry.stored_collections),
    "rules": (rules.decode, rules._fields, rules.Terms.decode),
    "invite": (pairing.parse_invite,),
    "envelope": (envelope.split_wire, envelope.decode_header, envelope.open_envelope),
    "relaywire": (relaywire.decode,),
    "bundle": (bundle.decode_bundle, bundle.decode_introduction, bundle.decode_file),
    "receipt": (receipt.decode_receipt,),
    "policy": (policy.decode_policy,),
    "canonical": (
        canonical.decode,
        canonical.decode_ordered,
        canonical.decode_signed,
        canonical.message_body,
        canonical.check_value,
    ),
    "advert": (adverts.parse_advert,),
}


def _code(function: Callable[..., object]) -> types.CodeType:
    return function.__code__


def _lines(code: types.CodeType) -> set[int]:
    """Lines of ``code`` and the code objects nested in it (lambdas, comprehensions)."""
    lines = {line for _, _, line in code.co_lines() if line is not None}
    lines.discard(code.co_firstlineno)  # the def line runs at import, not per call
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            lines |= _lines(const) | {const.co_firstlineno}
    return lines


def _helpers(functions: Iterable[Callable[..., object]]) -> dict[str, types.CodeType]:
    """``functions`` and the module-level functions of their modules whose names
    they mention, transitively: ``module:qualname`` -> code."""
    found: dict[str, types.CodeType] = {}
    todo = list(functions)
    while todo:
        function = todo.pop()
        code = _code(function)
        key = f"{function.__module__}:{function.__qualname__}"
        if key in found:
            continue
        found[key] = code
        module = sys.modules[function.__module__]
        names = set(code.co_names)
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                names |= set(const.co_names)
        for name in names:
            helper = getattr(module, name, None)
            if isinstance(helper, types.FunctionType) and helper.__module__ == module.__name__:
                todo.append(helper)
            table = helper if isinstance(helper, dict) else None
            if table is not None:  # a dispatch table of decoders (messages, relaywire)
                todo.extend(
                    v
                    for v in table.values()
                    if isinstance(v, types.FunctionType) and v.__module__ == module.__name__
                )
    return found


def replay(name: str, folder: Path) -> dict[str, set[int]]:
    """Run every input in ``folder`` through target ``name``; the lines run, by file."""
    ran: dict[str, set[int]] = {}

    def tracer(frame: types.FrameType, event: str, _arg: Any) -> Any:
        if event == "line":
            ran.setdefault(frame.f_code.co_filename, set()).add(frame.f_lineno)
        return tracer

    inputs = sorted(p for p in folder.iterdir() if p.is_file())
    sys.settrace(tracer)
    try:
        for path in inputs:
            with contextlib.suppress(Exception):  # a crash: scripts/fuzz reports those
                run_one(name, path.read_bytes())
    finally:
        sys.settrace(None)
    return ran


def report(name: str, folder: Path) -> list[str]:
    ran = replay(name, folder)
    out = [f"{name}: {sum(1 for _ in folder.iterdir())} inputs replayed"]
    total_hit = total = 0
    for key, code in sorted(_helpers(DECODERS[name]).items()):
        lines = _lines(code)
        hit = lines & ran.get(code.co_filename, set())
        total_hit += len(hit)
        total += len(lines)
        missed = sorted(lines - hit)
        shown = f"; never run: {', '.join(map(str, missed))}" if missed else ""
        out.append(f"  {key}: {len(hit)}/{len(lines)} lines{shown}")
    out[0] += f", decoder lines run {total_hit}/{total} ({100 * total_hit // max(total, 1)}%)"
    return out


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m fuzz.cover CORPUS [TARGET...]", file=sys.stderr)
        return 2
    root = Path(argv[0])
    for name in argv[1:] or list(TARGETS):
        if (root / name).is_dir():
            print("\n".join(report(name, root / name)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
