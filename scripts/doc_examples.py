"""The worked examples of ``docs/protocol.md``, ``docs/entry-format.md`` and ``docs/relay.md``.

Every example is computed here by the real code from fixed keys, nonces, salts
and times, so a second implementation can check its bytes against them. In the
docs each example is a fenced block right after a ``<!-- example: NAME -->``
line; ``tests/test_docs_examples.py`` recomputes them and fails when a block
differs, so the docs cannot drift from the code.

    .venv/bin/python scripts/doc_examples.py           # print every example
    .venv/bin/python scripts/doc_examples.py --write   # rewrite the blocks in docs/

Hex is wrapped at 32 bytes per line. Diagnostic notation (RFC 8949 §8) names
long byte strings instead of spelling them out: «A key» is A's Ed25519 public
key, and so on.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast
from unittest import mock

import nacl.bindings

from p2psync import pairing
from p2psync.api import Database
from p2psync.core import bundle as bundle_mod
from p2psync.core import canonical, frames, messages
from p2psync.core import entry as entry_mod
from p2psync.core import envelope as envelope_mod
from p2psync.core import hlc as hlc_mod
from p2psync.core import policy as policy_mod
from p2psync.core import receipt as receipt_mod
from p2psync.core import rules as rules_mod
from p2psync.core.entry import withhold
from p2psync.core.handshake import Handshake, x25519_public
from p2psync.core.identity import Identity, device_id, parse_device_id
from p2psync.core.messages import Head
from p2psync.core.rules import Direction, Mode, Route, RuleState, Terms

ROOT = Path(__file__).resolve().parent.parent
DOCS = (
    ROOT / "docs" / "protocol.md",
    ROOT / "docs" / "entry-format.md",
    ROOT / "docs" / "relay.md",
)
#: ``<!-- example: NAME -->`` then a fenced block
BLOCK = re.compile(r"<!-- example: ([a-z0-9-]+) -->\n```\n(.*?)```\n", re.DOTALL)

# The fixed inputs. Never use these keys for anything real.
A = Identity(bytes([0x01]) * 32)  # "alice": dials (initiator), proposes, joins
B = Identity(bytes([0x02]) * 32)  # "bob": listens (responder), accepts, invites
A_EPHEMERAL = bytes([0x11]) * 32
B_EPHEMERAL = bytes([0x22]) * 32
NONCE = bytes([0x03]) * 16
SECRET = bytes([0x04]) * 16
T0 = 1_700_000_000_000  # 2023-11-14T22:13:20Z, in ms
ENVELOPE_EPHEMERAL = bytes([0x55]) * 32  # the sealed box's ephemeral X25519 secret


# ---------------------------------------------------------------- formatting


def hexlines(label: str, data: bytes) -> str:
    """``label (N bytes)`` and the hex, 32 bytes per line, indented."""
    text = data.hex()
    lines = [f"{label} ({len(data)} bytes)"]
    lines += ["  " + text[i : i + 64] for i in range(0, len(text), 64)] or ["  (empty)"]
    return "\n".join(lines)


def diag(value: Any, names: dict[bytes, str], top: bool = False) -> str:
    """Diagnostic notation; byte strings in ``names`` are shown by name, other
    byte strings longer than 16 bytes by their length; a top-level map one
    entry per line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bytes):
        if value in names:
            return f"«{names[value]}»"
        if len(value) > 16:
            return f"h'…' ({len(value)} bytes)"
        return f"h'{value.hex()}'"
    if isinstance(value, list):
        return "[" + ", ".join(diag(item, names) for item in value) + "]"
    assert isinstance(value, dict)
    items = [f"{diag(k, names)}: {diag(v, names)}" for k, v in value.items()]
    if top:
        return "{" + ",\n   ".join(items) + "}"
    return "{" + ", ".join(items) + "}"


def block(*parts: str) -> str:
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------- the examples


@contextmanager
def fixed_invite_inputs() -> Iterator[None]:
    """``pairing.create_invite`` with SECRET as its randomness and T0 as now."""
    with (
        mock.patch.object(pairing, "now_ms", lambda: T0),
        mock.patch.object(os, "urandom", lambda n: SECRET[:n]),
    ):
        yield


def examples() -> dict[str, str]:
    out: dict[str, str] = {}
    names = {A.public_key: "A key", B.public_key: "B key"}

    # -------------------------------------------------- identities (entry-format §2)
    check = hashlib.blake2b(A.public_key, digest_size=2, person=b"p2psync-devid").digest()
    b32 = base64.b32encode(A.public_key + check).decode().rstrip("=")
    text = device_id(A.public_key)
    assert parse_device_id(text.lower()) == A.public_key
    out["device-id"] = block(
        hexlines("seed", A.seed),
        hexlines("Ed25519 public key", A.public_key),
        hexlines('check = BLAKE2b(key, digest 2, person "p2psync-devid")', check),
        f"base32(key || check), 55 characters: {b32}",
        f"Luhn mod 32 character: {text[-1]}",
        f"device ID: {text}",
        f"short ID: {text[:7]}",
    )

    # -------------------------------------------------- keys and handshake (protocol §2)
    for ident in (A, B):  # the X25519 private key: SHA-512 of the seed, first half, clamped
        half = bytearray(hashlib.sha512(ident.seed).digest()[:32])
        half[0] &= 248
        half[31] = (half[31] & 127) | 64
        assert bytes(half) == ident.x25519_private
    out["keys"] = block(
        *(
            part
            for who, ident in (("A", A), ("B", B))
            for part in (
                hexlines(f"{who} seed", ident.seed),
                hexlines(
                    f"{who} Ed25519 public key (device ID {ident.short_id}…)", ident.public_key
                ),
                hexlines(f"{who} X25519 static private key", ident.x25519_private),
                hexlines(f"{who} X25519 static public key", x25519_public(ident.public_key)),
            )
        )
    )
    initiator = Handshake(
        A, initiator=True, ephemeral=A_EPHEMERAL, name="alice", expect=B.public_key
    )
    responder = Handshake(B, initiator=False, ephemeral=B_EPHEMERAL, name="bob")
    message1 = initiator.start()
    assert message1 is not None
    message2 = responder.receive(message1)
    assert message2 is not None
    message3 = initiator.receive(message2)
    assert message3 is not None and responder.receive(message3) is None
    mine, theirs = initiator.outcome, responder.outcome
    assert mine is not None and theirs is not None
    assert mine.handshake_hash == theirs.handshake_hash and mine.send_key == theirs.receive_key
    payload_b = canonical.decode(responder._payload, what="payload", max_depth=1)
    names_hs = {**names, payload_b[2]: "B binding signature"}
    out["handshake"] = block(
        hexlines("A ephemeral private key", A_EPHEMERAL),
        hexlines("B ephemeral private key", B_EPHEMERAL),
        hexlines("B identity payload (message 2, before encryption)", responder._payload),
        "  " + diag(payload_b, names_hs),
        hexlines("A identity payload (message 3, before encryption)", initiator._payload),
        hexlines("message 1 frame", frames.frame(message1)),
        hexlines("message 2 frame", frames.frame(message2)),
        hexlines("message 3 frame", frames.frame(message3)),
        hexlines("handshake hash h after message 3", mine.handshake_hash),
        hexlines("c1 key (A -> B frames)", mine.send_key),
        hexlines("c2 key (B -> A frames)", mine.receive_key),
    )

    # -------------------------------------------------- sealed frames and messages (§3, §4)
    empty_rules = messages.rules_digest([])
    a_first = frames.Sealer(mine.send_key)
    b_first = frames.Sealer(theirs.send_key)
    rules_held = messages.encode(messages.RulesHeld(empty_rules, False))
    frame_a0 = a_first.seal(rules_held)
    frame_a1 = a_first.seal(messages.encode(messages.Ping(1)))
    frame_b0 = b_first.seal(rules_held)
    opener = frames.Opener(theirs.receive_key)
    assert opener.open(frame_a0[:4], frame_a0[4:]) == rules_held
    out["sealed-frames"] = block(
        hexlines("A's first message: RulesHeld(digest of no objects, false)", rules_held),
        hexlines("nonce for counter 0", frames._nonce(0)),
        hexlines("A's frame 0 (c1, counter 0): length || ciphertext || tag", frame_a0),
        hexlines("nonce for counter 1", frames._nonce(1)),
        hexlines("A's frame 1 (c1, counter 1): Ping(1)", frame_a1),
        hexlines("B's frame 0 (c2, counter 0): the same RulesHeld", frame_b0),
    )

    # -------------------------------------------------- entries (entry-format)
    hlc1 = T0 << 16
    op1 = entry_mod.make_op(
        entry_mod.OpKind.PUT, "notes", "n1", {"text": "hello"}, [], bytes([0x05]) * 16
    )
    entry1 = entry_mod.sign_entry(A, 1, None, hlc1, [op1])
    op2 = entry_mod.make_op(
        entry_mod.OpKind.DELETE, "notes", "n1", None, [entry1.id], bytes([0x06]) * 16
    )
    op3 = entry_mod.make_op(
        entry_mod.OpKind.PUT, "photos", "p1", b"\x89PNG", [], bytes([0x07]) * 16
    )
    entry2 = entry_mod.sign_entry(A, 2, entry1.id, hlc1 + (1000 << 16), [op2, op3])
    withheld = withhold(entry2.wire(), lambda collection: collection != "photos")
    assert entry_mod.decode_wire(withheld).ops[1] is None
    for built in (entry1, entry2):
        decoded = entry_mod.decode_wire(built.wire())
        assert decoded.id == built.id and decoded.signature_valid()
    names_e = {**names, entry1.id: "entry 1 ID", op1.digest: "op digest"}
    body1 = canonical.decode(entry1.body, what="body", max_depth=3)
    out["entry-1"] = block(
        "author A (seed 01*32), seq 1, hlc = 1700000000000 << 16, one op:",
        'put("notes", "n1", {"text": "hello"}), salt 05*16, no bases',
        hexlines("op payload", op1.payload),
        "  " + diag(canonical.decode(op1.payload, what="p", max_depth=3), names_e),
        hexlines("op digest = BLAKE2b-256(payload)", op1.digest),
        hexlines("body", entry1.body),
        "  " + diag(body1, names_e, top=True),
        hexlines('signature = Ed25519(A, "p2psync/v1/entry" || 00 || body)', entry1.signature),
        hexlines("signed = [body, signature]", entry1.signed),
        hexlines("entry ID = BLAKE2b-256(signed)", entry1.id),
        hexlines("wire = [signed, [payload]]", entry1.wire()),
    )
    out["entry-2"] = block(
        "author A, seq 2, prev = entry 1 ID, hlc = entry 1's + (1000 << 16), two ops:",
        'delete("notes", "n1") with bases [entry 1 ID], salt 06*16;',
        'put("photos", "p1", h\'89504e47\'), salt 07*16, no bases',
        hexlines("op 1 payload", op2.payload),
        hexlines("op 2 payload", op3.payload),
        hexlines("body", entry2.body),
        "  " + diag(canonical.decode(entry2.body, what="body", max_depth=3), names_e, top=True),
        hexlines("entry ID", entry2.id),
        hexlines("wire, both payloads", entry2.wire()),
        hexlines('wire to a receiver that may not see "photos" (op 2 withheld)', withheld),
    )

    # -------------------------------------------------- messages (protocol §4)
    heads = {A.public_key: Head(2, entry2.id, False)}
    samples: list[tuple[str, messages.Message]] = [
        ("RulesHeld(digest of no objects, false)", messages.RulesHeld(empty_rules, False)),
        ("Have: A at seq 2", messages.Have(heads)),
        ("Ack(1)", messages.Ack(1)),
        ("Caught(heads digest of the Have above)", messages.Caught(messages.heads_digest(heads))),
        ("Ping(1)", messages.Ping(1)),
        ("Pong(1)", messages.Pong(1)),
        ('Bye("synced")', messages.Bye("synced")),
        ("Rules([]) (sent when we hold no objects and the digests differ)", messages.Rules([])),
    ]
    lines = []
    for label, message in samples:
        encoded = messages.encode(message)
        assert messages.decode(encoded) == message
        lines.append(hexlines(label, encoded))
    out["messages"] = block(*lines)
    out["digests"] = block(
        hexlines("rules digest of no objects", empty_rules),
        hexlines("heads digest of no authors", messages.heads_digest({})),
        hexlines(
            "heads digest input for A at seq 2: A key || seq (8, big-endian) || head",
            A.public_key + (2).to_bytes(8, "big") + entry2.id,
        ),
        hexlines("heads digest of A at seq 2", messages.heads_digest(heads)),
    )

    # -------------------------------------------------- rule objects (protocol §6)
    proposed = Terms.make(["photos/*", "notes", "notes"], Direction.BOTH, Mode.ONLINE, Route.AUTO)
    proposal = rules_mod.propose(A, B.public_key, proposed, NONCE, T0)
    proposal_id = rules_mod.rule_id(proposal)
    narrowed = Terms.make(["notes"], Direction.SEND, Mode.ONLINE, Route.AUTO)
    acceptance = rules_mod.accept(B, proposal_id, narrowed, T0 + 60_000)
    acceptance_id = rules_mod.rule_id(acceptance)
    decoded_p, decoded_a = rules_mod.decode(proposal), rules_mod.decode(acceptance)
    rule = rules_mod.fold([decoded_p, decoded_a])[proposal_id]
    assert rule.state is RuleState.ACCEPTED and rule.terms == narrowed
    assert rule.terms_for(B.public_key).direction is Direction.RECEIVE
    names_r = {**names, proposal_id: "proposal ID"}
    for signed in (proposal, acceptance):
        body_bytes, signature = canonical.decode(signed, what="rule", max_depth=1)
        names_r[body_bytes] = "body"
        names_r[signature] = "signature"
    body_p = canonical.decode(
        canonical.decode(proposal, what="r", max_depth=1)[0], what="b", max_depth=3
    )
    body_a = canonical.decode(
        canonical.decode(acceptance, what="r", max_depth=1)[0], what="b", max_depth=3
    )
    out["rule-proposal"] = block(
        'A proposes to B: patterns given as ["photos/*", "notes", "notes"], both,',
        f"online, auto; nonce 03*16; time {T0} ms",
        hexlines("body", canonical.decode(proposal, what="r", max_depth=1)[0]),
        "  " + diag(body_p, names_r, top=True),
        hexlines(
            'signature = Ed25519(A, "p2psync/v1/rule" || 00 || body)',
            canonical.decode(proposal, what="r", max_depth=1)[1],
        ),
        hexlines("signed object = [body, signature]", proposal),
        "  " + diag(canonical.decode(proposal, what="r", max_depth=1), names_r),
        hexlines("proposal ID = BLAKE2b-256(signed object)", proposal_id),
    )
    out["rule-acceptance"] = block(
        'B accepts, narrowed to ["notes"], send (in A\'s view: A sends, B receives),',
        f"online, auto; time {T0 + 60_000} ms",
        hexlines("body", canonical.decode(acceptance, what="r", max_depth=1)[0]),
        "  " + diag(body_a, names_r, top=True),
        hexlines("signed object", acceptance),
        hexlines("acceptance ID", acceptance_id),
        hexlines(
            "rules digest of {proposal, acceptance}", messages.rules_digest([proposal, acceptance])
        ),
        hexlines(
            "Rules([proposal, acceptance]) message",
            messages.encode(messages.Rules([proposal, acceptance])),
        ),
    )

    # -------------------------------------------------- invites (protocol §6)
    invite_terms = Terms.make(["notes"])
    terms_cbor = canonical.encode(invite_terms.encode())
    stub = SimpleNamespace(identity=B, store=SimpleNamespace(add_invite=lambda *args: None))
    with fixed_invite_inputs():
        code = pairing.create_invite(
            cast(Database, stub), invite_terms, 600, ["192.0.2.7:22000", "[2001:db8::7]:22000"]
        )
    parsed = pairing.parse_invite(code.lower().replace("-", " - "))
    assert parsed.secret == SECRET and parsed.inviter == B.public_key
    raw = base64.b32decode(code[5:].replace("-", "") + "=" * (-len(code[5:].replace("-", "")) % 8))
    payload, check2 = raw[:-2], raw[-2:]
    names_i = {**names}
    proof = pairing.join_proof(SECRET, mine.handshake_hash)
    join = messages.encode(messages.Join(parsed.invite, proof))
    out["invite"] = block(
        'B invites: terms [["notes"], "both", "online", "auto"], secret 04*16,',
        f"made at {T0} ms, valid 600 s, addresses 192.0.2.7:22000 and [2001:db8::7]:22000",
        hexlines("terms CBOR", terms_cbor),
        hexlines("terms hash = BLAKE2b(terms CBOR, digest 8)", pairing.terms_hash(invite_terms)),
        hexlines('invite ID = BLAKE2b(secret, digest 8, person "p2psync-invite")', parsed.invite),
        hexlines("code payload", payload),
        "  " + diag(canonical.decode(payload, what="p", max_depth=3), names_i),
        hexlines("check = BLAKE2b(payload, digest 2)", check2),
        "code:",
        "  " + code,
        "A joins over the handshake above (A dials B):",
        hexlines('proof = BLAKE2b("p2psync/v1/join" || 00 || h, key secret, digest 32)', proof),
        hexlines("Join(invite ID, proof) message", join),
    )
    relay_examples(out, names)
    return out


def relay_examples(out: dict[str, str], names: dict[bytes, str]) -> None:
    """docs/relay.md: an envelope from A to B, B's receipt for it, B's mailbox policy."""
    expiry = T0 + 7 * 24 * 3600 * 1000
    payload = b"hello, B"
    wire = envelope_mod.seal_envelope(
        A, B.public_key, 1, envelope_mod.EnvelopeClass.DATA, expiry, payload, ENVELOPE_EPHEMERAL
    )
    header_map, sealed = canonical.decode(wire, what="envelope", max_depth=2)
    opened = envelope_mod.open_envelope(B, wire, depositor=A.public_key)
    body, signature = canonical.decode(opened.signed, what="signed", max_depth=1)
    assert signature == A.sign(envelope_mod.ENVELOPE_PREFIX + body)
    rpk = nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(B.public_key)
    epk = nacl.bindings.crypto_scalarmult_base(ENVELOPE_EPHEMERAL)
    nonce = hashlib.blake2b(epk + rpk, digest_size=24).digest()
    content = len(opened.signed).to_bytes(4, "big") + opened.signed
    out["envelope"] = block(
        f'A seals to B: seq 1, class 1 (data), expiry {expiry} ms, payload "hello, B",',
        "ephemeral X25519 secret 55*32",
        hexlines("body CBOR", body),
        "  " + diag(canonical.decode(body, what="b", max_depth=1), names, top=True),
        hexlines('signature = Ed25519(A, "p2psync/v1/envelope" || 00 || body)', signature),
        hexlines("signed = CBOR [body, signature]", opened.signed),
        f"content = u32be({len(opened.signed)}) || signed: {len(content)} bytes; "
        f"+ 48 = {len(content) + 48} -> bucket {len(sealed)}: "
        f"{len(sealed) - 48 - len(content)} zero bytes of padding",
        hexlines("rpk = X25519 form of B's key", rpk),
        hexlines("epk = X25519(55*32, base point)", epk),
        hexlines("nonce = BLAKE2b(epk || rpk, digest 24)", nonce),
        hexlines("header CBOR", canonical.encode(header_map)),
        "  " + diag(header_map, names, top=True),
        hexlines("wire = CBOR [header, epk || crypto_box(plaintext, nonce, rpk, esk)]", wire),
    )
    heads = {A.public_key: Head(5, bytes([0xA5]) * 32), B.public_key: Head(2, bytes([0xB2]) * 32)}
    signed = receipt_mod.sign_receipt(B, A.public_key, [1, 2], {3: "expired"}, heads, T0)
    receipt_body, receipt_signature = canonical.decode(signed, what="receipt", max_depth=1)
    assert receipt_mod.decode_receipt(signed).applied == (1, 2)
    names_r = {**names, bytes([0xA5]) * 32: "A5*32", bytes([0xB2]) * 32: "B2*32"}
    out["receipt"] = block(
        'B\'s receipt for A: applied 1 and 2, refused 3 ("expired"), heads A: 5 (A5*32),',
        f"B: 2 (B2*32), at {T0} ms",
        hexlines("body CBOR", receipt_body),
        "  " + diag(canonical.decode(receipt_body, what="b", max_depth=3), names_r, top=True),
        hexlines('signature = Ed25519(B, "p2psync/v1/receipt" || 00 || body)', receipt_signature),
        hexlines("receipt = CBOR [body, signature] (the payload of a class 3 envelope)", signed),
    )
    other = bytes([0xC3]) * 32
    wire = policy_mod.sign_policy(B, 1, [other, A.public_key], T0)
    policy_body, policy_signature = canonical.decode(wire, what="policy", max_depth=1)
    assert policy_mod.decode_policy(wire, owner=B.public_key).senders == (A.public_key, other)
    names_p = {**names, other: "C3*32"}
    out["mailbox-policy"] = block(
        f"B's mailbox policy, version 1: data from A and from C3*32, at {T0} ms",
        hexlines("body CBOR", policy_body),
        "  " + diag(canonical.decode(policy_body, what="b", max_depth=2), names_p, top=True),
        hexlines(
            'signature = Ed25519(B, "p2psync/v1/mailbox-policy" || 00 || body)', policy_signature
        ),
        hexlines("policy = CBOR [body, signature]", wire),
    )
    bundle_example(out, names)


def bundle_example(out: dict[str, str], names: dict[bytes, str]) -> None:
    """docs/relay.md: A's bundle to B carrying A's first entry, without rule objects."""
    op = entry_mod.make_op(
        entry_mod.OpKind.PUT, "vouchers", "V-1", {"amount": 10}, (), bytes([0x5A]) * 16
    )
    entry = entry_mod.sign_entry(A, 1, None, hlc_mod.from_wall(T0), [op])
    digest = messages.rules_digest([])
    bundle = bundle_mod.Bundle({A.public_key: Head(1, entry.id)}, digest, (), (entry.wire(),))
    encoded = bundle_mod.encode_bundle(bundle)
    assert bundle_mod.decode_bundle(encoded) == bundle
    names_b = {**names, entry.id: "A1 entry ID", entry.wire(): "A1 entry wire form"}
    out["bundle"] = block(
        "A's bundle for B: heads A: 1 (its first entry, vouchers/V-1 = {amount: 10},",
        f"at {T0} ms), the digest of no rule objects, no rule objects, that entry",
        hexlines("rules digest = digest of [] (docs/protocol.md)", digest),
        hexlines("entry wire form", entry.wire()),
        hexlines("bundle CBOR (the payload of a class 1 envelope)", encoded),
        "  " + diag(canonical.decode(encoded, what="b", max_depth=3), names_b, top=True),
    )


# ---------------------------------------------------------------- docs


def blocks_in(text: str) -> dict[str, str]:
    return {name: body for name, body in BLOCK.findall(text)}


def rewrite(text: str, wanted: dict[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        return f"<!-- example: {name} -->\n```\n{wanted.get(name, match.group(2))}```\n"

    return BLOCK.sub(replace, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="rewrite the blocks in docs/")
    args = parser.parse_args(argv)
    wanted = examples()
    if not args.write:
        for name, body in wanted.items():
            print(f"<!-- example: {name} -->\n```\n{body}```\n")
        return 0
    for path in DOCS:
        text = path.read_text()
        path.write_text(rewrite(text, wanted))
    return 0


if __name__ == "__main__":
    sys.exit(main())
