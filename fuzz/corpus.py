"""Seed corpus: valid inputs for every fuzz target, made by the project's own encoders.

``python -m fuzz.corpus DIR`` writes ``DIR/TARGET/seed-NNN`` for every target in
``fuzz/targets.py`` (``scripts/fuzz`` runs it before each campaign). The seeds are
generated rather than committed: they are rebuilt from the current encoders, so a
change of format can never leave a stale corpus behind, and no binary files live
in the repository. Deterministic (fixed keys, nonces, times): the same code gives
the same seeds. Each seed carries its target's mode byte (see the target's doc).
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from fuzz import targets
from fuzz.targets import ALICE, BOB, FRAME_KEY, RELAY, join2, sealed_signed, signed_pair
from p2psync.core import (
    bundle,
    canonical,
    entry,
    envelope,
    frames,
    messages,
    policy,
    receipt,
    relaywire,
    rules,
)
from p2psync.core.entry import OpKind, make_op, sign_entry
from p2psync.core.messages import Head
from p2psync.core.rules import Direction, Mode, Route, Terms

T0 = 1_800_000_000_000


def _h(label: str, size: int = 32) -> bytes:
    return hashlib.blake2b(label.encode(), digest_size=size).digest()


def sample_entries() -> list[entry.Entry]:
    first = sign_entry(
        ALICE,
        1,
        None,
        T0 << 16,
        [
            make_op(
                OpKind.PUT, "vouchers", "V-1", {"party": "ACME", "amount": 1200}, [], _h("s1", 16)
            )
        ],
    )
    second = sign_entry(
        ALICE,
        2,
        first.id,
        (T0 + 5) << 16,
        [
            make_op(
                OpKind.PUT,
                "ledgers",
                "ACME",
                {"balance": 1.5, "tags": ["a", b"\x00"]},
                [],
                _h("s2", 16),
            ),
            make_op(OpKind.DELETE, "vouchers", "V-1", None, [first.id], _h("s3", 16)),
            make_op(
                OpKind.PUT, "stock", "ééé", [None, True, -7, {"x": {"y": []}}], [], _h("s4", 16)
            ),
        ],
    )
    return [first, second]


def _rule_objects() -> list[bytes]:
    terms = Terms.make(["vouchers", "ledgers*"], Direction.SEND, Mode.ONLINE, Route.AUTO)
    proposal = rules.propose(ALICE, BOB.public_key, terms, _h("nonce", 16), T0)
    pid = rules.rule_id(proposal)
    return [
        proposal,
        rules.accept(BOB, pid, Terms.make(["vouchers"], Direction.RECEIVE), T0 + 1),
        rules.reject(BOB, pid, "not now", T0 + 2),
        rules.revoke(ALICE, pid, T0 + 3),
    ]


def _bodies(signed: list[bytes]) -> list[bytes]:
    """The body part of each ``[body, signature]``."""
    return [canonical.decode_signed(s, what="seed")[0] for s in signed]


def _heads() -> dict[bytes, Head]:
    return {
        ALICE.public_key: Head(2, _h("head a"), False),
        BOB.public_key: Head(7, _h("head b"), True),
    }


def _frames() -> list[bytes]:
    sealer = frames.Sealer(FRAME_KEY)
    stream = b"".join(sealer.seal(m) for m in (b"", b"hello", bytes(300)))
    plain = frames.frame(b"\x01" * 32) + frames.frame(b"")
    return [bytes([0]) + stream, bytes([7]) + stream, bytes([0x80]) + plain, bytes([0x83]) + plain]


def _handshake() -> list[bytes]:
    ours, theirs = targets._initiator(), targets._responder()
    first = ours.start()
    assert first is not None
    second = theirs.receive(first)
    assert second is not None
    return [
        bytes([0]) + first,
        bytes([1]) + second,
        bytes([2]) + theirs._payload,  # Bob's identity payload, as his handshake sends it
        bytes([3]) + ours._payload,
    ]


def _messages() -> list[bytes]:
    wires = [e.wire() for e in sample_entries()]
    return [
        messages.encode(m)
        for m in (
            messages.Have(_heads()),
            messages.Have({}),
            messages.Entries(3, wires),
            messages.Ack(3),
            messages.Caught(_h("d", 16)),
            messages.Ping(1 << 40),
            messages.Pong(0),
            messages.Bye("shutting down"),
            messages.Rules(_rule_objects()),
            messages.Join(_h("i", 8), _h("p")),
            messages.RulesHeld(_h("r", 16), True),
            messages.Stuck("entry 4: its clock is far ahead"),
        )
    ]


def _relaywire() -> list[bytes]:
    w = relaywire
    held = (w.Held(1, T0, b"\x82\x01\x02"), w.Held(5, T0 + 1, b"x"))
    return [
        w.encode(m)
        for m in (
            w.Hello(None),
            w.Hello((_h("t", 8), _h("proof"))),
            w.Welcome(T0, 1 << 20, 1000, 10_000),
            w.Bye("later"),
            w.Policy(1, b"policy"),
            w.Deposit(2, b"envelope"),
            w.Fetch(3, 0, 10),
            w.Delete(4, ((ALICE.public_key, 1), (BOB.public_key, 9))),
            w.Retract(5, BOB.public_key, (1, 2, 3)),
            w.TakeNotices(6),
            w.Ping(7),
            w.Pong(7),
            w.Arrived(8),
            w.Stored(9, T0),
            w.Duplicate(10, T0),
            w.Refused(11, w.RefusalCode(next(iter(w.RefusalCode)).value), "full"),
            w.Envelopes(12, held, True),
            w.Done(13, 2),
            w.Notices(14, (w.Notice(BOB.public_key, 1, T0),)),
            w.Connect(15, BOB.public_key),
            w.Invitation(16, BOB.public_key, _h("k"), T0, "relay.example:7718"),
            w.Invitation(16, BOB.public_key, _h("k"), T0),
            w.Invited(ALICE.public_key, _h("k"), T0),
            w.Join(_h("k")),
            w.Spliced(ALICE.public_key),
        )
    ]


def _entry() -> list[bytes]:
    seeds = []
    for e in sample_entries():
        seeds.append(bytes([0]) + e.wire())
        seeds.append(bytes([1]) + join2(e.signed, e.payloads_blob))
        seeds.append(bytes([2]) + e.signed)
    withheld = entry.withhold(sample_entries()[1].wire(), lambda c: c != "ledgers")
    seeds.append(bytes([0]) + withheld)
    for e in sample_entries():  # mode 3: payloads, one or a list
        seeds.append(bytes([3]) + e.payloads_blob)
        seeds += [bytes([3]) + p for p in e.payloads if p is not None]
    return seeds


def _rules() -> list[bytes]:
    objects = _rule_objects()
    signers = [1, 2, 2, 1]  # Alice proposes and revokes, Bob answers
    bodies = [bytes([m]) + b for m, b in zip(signers, _bodies(objects), strict=True)]
    return [bytes([0]) + o for o in objects] + bodies


def _invite_payloads() -> list[bytes]:
    terms_hash = _h("terms", 8)
    hints = [[bytes([127, 0, 0, 1]), 7717], [bytes(15) + b"\x01", 7717]]
    plain = [ALICE.public_key, _h("inv", 8), _h("sec", 16), hints, T0, terms_hash]
    relayed = [*plain, [RELAY.public_key, [[bytes([10, 0, 0, 9]), 7718]]]]
    return [canonical.encode(plain), canonical.encode(relayed)]


def _invite() -> list[bytes]:
    payloads = _invite_payloads()
    texts = [targets.invite_text(p).encode() for p in payloads]
    return [bytes([0]) + t for t in texts] + [bytes([1]) + p for p in payloads]


def _payloads() -> tuple[bytes, bytes, bytes]:
    """A bundle, an introduction and a receipt, as envelopes carry them."""
    wires = tuple(e.wire() for e in sample_entries())
    data = bundle.encode_bundle(
        bundle.Bundle(_heads(), _h("r", 16), tuple(_rule_objects()[:1]), wires)
    )
    intro = bundle.encode_introduction(
        bundle.Introduction(
            "Head office", tuple(_rule_objects()[:2]), (_h("i", 8), _h("p")), (_h("i", 8), "no")
        )
    )
    signed = receipt.sign_receipt(ALICE, BOB.public_key, [1, 2, 5], {3: "bad"}, _heads(), T0)
    return data, intro, signed


def _envelopes() -> list[bytes]:
    data, intro, signed_receipt = _payloads()
    wires = []
    for seq, (cls, payload) in enumerate(
        (
            (envelope.EnvelopeClass.DATA, data),
            (envelope.EnvelopeClass.INTRODUCTION, intro),
            (envelope.EnvelopeClass.RECEIPT, signed_receipt),
        ),
        start=1,
    ):
        wires.append(
            envelope.seal_envelope(
                ALICE, BOB.public_key, seq, cls, targets.EXPIRY_MS, payload, _h(f"e{seq}")
            )
        )
    return wires


def _envelope() -> list[bytes]:
    wires = _envelopes()
    seeds = [bytes([0]) + w for w in wires] + [bytes([2]) + w for w in wires]
    header, _sealed = envelope.split_wire(wires[0])
    seeds.append(bytes([1]) + header.encode())
    # mode 3: the plaintext (length prefix and signed part; the target pads it),
    # mode 4: the signed body; each as the envelope to Bob the target builds
    body = canonical.encode(
        {
            0: 1,
            1: ALICE.public_key,
            2: BOB.public_key,
            3: 1,
            4: 1,
            5: targets.EXPIRY_MS,
            6: b"payload",
        }
    )
    signed = signed_pair(ALICE, envelope.ENVELOPE_PREFIX, body)
    seeds.append(bytes([3]) + len(signed).to_bytes(4, "big") + signed)
    seeds.append(bytes([4]) + body)
    assert envelope.open_envelope(BOB, sealed_signed(signed, envelope.EnvelopeClass.DATA))
    return seeds


def _bundle() -> list[bytes]:
    data, intro, _ = _payloads()
    file = bundle.encode_file(_envelopes())
    asks = bundle.encode_bundle(
        bundle.Bundle(_heads(), _h("r", 16), wants=tuple(sorted((_h("w1"), _h("w2")))))
    )
    return [
        bytes([0]) + data,
        bytes([0]) + asks,
        bytes([1]) + intro,
        bytes([2]) + file,
        bytes([2]) + bundle.encode_file([]),
    ]


def _receipt() -> list[bytes]:
    signed = _payloads()[2]
    empty = receipt.sign_receipt(ALICE, BOB.public_key, [], {}, {}, 0)
    return [
        bytes([0]) + signed,
        bytes([0]) + empty,
        *(bytes([1]) + b for b in _bodies([signed, empty])),
    ]


def _policy() -> list[bytes]:
    signed = [
        policy.sign_policy(ALICE, 1, [BOB.public_key, RELAY.public_key], T0),
        policy.sign_policy(ALICE, 9, [], T0),
    ]
    return [bytes([0]) + s for s in signed] + [bytes([1]) + b for b in _bodies(signed)]


def _canonical() -> list[bytes]:
    values = [
        {"a": 1, "bb": [1.5, -2, None, True, b"x"], "c": {"d": "é"}},
        [0, 23, 24, 255, 256, 65535, 65536, (1 << 32), (1 << 64) - 1, -(1 << 64)],
        [0.0, -0.0, 1e300, 5.960464477539063e-08, 3.4028234663852886e38],
    ]
    seeds = [bytes([0]) + canonical.encode(v) for v in values]
    seeds += [bytes([1]) + e.signed for e in sample_entries()]
    seeds += [bytes([2]) + o for o in _rule_objects()[:2]]
    seeds += [bytes([3]) + m for m in _messages()[:4]]
    return seeds


def _advert() -> list[bytes]:
    return [
        b"v=1\x00id=" + ALICE.device_id.encode() + b"\x00name=Head office",
        b"v=1\x00id=" + BOB.device_id.lower().replace("-", "").encode() + b"\x00name",
    ]


SEEDS = {
    "frames": _frames,
    "handshake": _handshake,
    "messages": _messages,
    "entry": _entry,
    "rules": _rules,
    "invite": _invite,
    "envelope": _envelope,
    "relaywire": _relaywire,
    "bundle": _bundle,
    "receipt": _receipt,
    "policy": _policy,
    "canonical": _canonical,
    "advert": _advert,
}


def write(root: Path, names: list[str] | None = None) -> dict[str, int]:
    """Write the seeds of ``names`` (all targets by default) under ``root``."""
    counts = {}
    for name in names or list(SEEDS):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        seeds = SEEDS[name]()
        for i, seed in enumerate(seeds):
            (folder / f"seed-{i:03d}").write_bytes(seed)
        counts[name] = len(seeds)
    return counts


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m fuzz.corpus DIR [TARGET...]", file=sys.stderr)
        return 2
    for name, count in write(Path(argv[0]), argv[1:] or None).items():
        print(f"{name}: {count} seeds")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
