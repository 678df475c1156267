"""Run a command as systemd's ``MemoryDenyWriteExecute=yes`` would: ``python
tests/nowx.py COMMAND...``.

The same seccomp filter as systemd's (x86-64 Linux): ``mmap`` of memory both
writable and executable, ``mprotect``/``pkey_mprotect`` making memory
executable, and ``shmat`` with ``SHM_EXEC`` fail with EPERM, in the command and
every process it starts. Written out in BPF here, so the tests need no
libseccomp. Exits 3 where the filter cannot be installed (another machine
type, no seccomp)."""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
import sys

AUDIT_ARCH_X86_64 = 0xC000003E
MMAP, MPROTECT, SHMAT, PKEY_MPROTECT = 9, 10, 30, 329
PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0x8000
RET_ALLOW, RET_EPERM = 0x7FFF0000, 0x00050000 | errno.EPERM
LD_ABS, JEQ, AND, RET = 0x20, 0x15, 0x54, 0x06  # BPF_LD|W|ABS, JMP|JEQ|K, ALU|AND|K, RET|K
NR, ARCH, ARG2 = 0, 4, 16 + 2 * 8  # offsets in struct seccomp_data (little-endian)
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2


def program() -> list[tuple[int, int, int, int]]:
    """The filter as (code, jump if true, jump if false, k); jumps by label."""
    source: list[tuple[str, tuple[int, str | int, str | int, int]]] = [
        ("", (LD_ABS, 0, 0, ARCH)),
        ("", (JEQ, 0, "deny", AUDIT_ARCH_X86_64)),
        ("", (LD_ABS, 0, 0, NR)),
        ("", (JEQ, "mmap", 0, MMAP)),
        ("", (JEQ, "mprotect", 0, MPROTECT)),
        ("", (JEQ, "mprotect", 0, PKEY_MPROTECT)),
        ("", (JEQ, "shmat", 0, SHMAT)),
        ("", (RET, 0, 0, RET_ALLOW)),
        ("mmap", (LD_ABS, 0, 0, ARG2)),
        ("", (AND, 0, 0, PROT_WRITE | PROT_EXEC)),
        ("", (JEQ, "deny", "allow", PROT_WRITE | PROT_EXEC)),
        ("mprotect", (LD_ABS, 0, 0, ARG2)),
        ("", (AND, 0, 0, PROT_EXEC)),
        ("", (JEQ, "deny", "allow", PROT_EXEC)),
        ("shmat", (LD_ABS, 0, 0, ARG2)),
        ("", (AND, 0, 0, SHM_EXEC)),
        ("", (JEQ, "deny", "allow", SHM_EXEC)),
        ("allow", (RET, 0, 0, RET_ALLOW)),
        ("deny", (RET, 0, 0, RET_EPERM)),
    ]
    labels = {label: pc for pc, (label, _) in enumerate(source) if label}

    def offset(pc: int, target: str | int) -> int:
        return target if isinstance(target, int) else labels[target] - pc - 1

    return [
        (code, offset(pc, jt), offset(pc, jf), k)
        for pc, (_, (code, jt, jf, k)) in enumerate(source)
    ]


def install() -> None:
    filters = b"".join(struct.pack("=HBBI", *row) for row in program())
    buffer = ctypes.create_string_buffer(filters)
    fprog = struct.pack("=HxxxxxxQ", len(filters) // 8, ctypes.addressof(buffer))
    prog = ctypes.create_string_buffer(fprog)
    libc = ctypes.CDLL(None, use_errno=True)
    for args in (
        (PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
        (PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(prog), 0, 0),
    ):
        if libc.prctl(*[ctypes.c_ulong(a) for a in args]) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: python tests/nowx.py COMMAND [ARG...]")
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        print("nowx: only for x86-64 Linux", file=sys.stderr)
        sys.exit(3)
    try:
        install()
    except OSError as exc:
        print(f"nowx: cannot install the filter: {exc}", file=sys.stderr)
        sys.exit(3)
    os.execvp(sys.argv[1], sys.argv[1:])


if __name__ == "__main__":
    main()
