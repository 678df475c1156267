"""Noise (25519_ChaChaPoly_BLAKE2b): the cacophony vectors byte for byte, hostile input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2psync.core.noise import (
    MAX_MESSAGE,
    PATTERNS,
    CipherState,
    HandshakeState,
    KeyPair,
    parse_pattern,
)
from p2psync.errors import DecryptError, HandshakeError, P2PSyncError

pytestmark = pytest.mark.pure

VECTOR_FILE = Path(__file__).parent / "vectors" / "noise-25519-chachapoly-blake2b.json"
VECTORS: list[dict[str, Any]] = json.loads(VECTOR_FILE.read_text())["vectors"]
PREFIX, SUFFIX = "Noise_", "_25519_ChaChaPoly_BLAKE2b"
REQUIRED = {"NN", "XX", "XXpsk3"}


def pattern_of(vector: dict[str, Any]) -> str:
    name: str = vector["protocol_name"]
    assert name.startswith(PREFIX) and name.endswith(SUFFIX), name
    return name[len(PREFIX) : -len(SUFFIX)]


def supported(pattern: str) -> bool:
    try:
        parse_pattern(pattern)
    except HandshakeError:
        return False
    return True


BY_PATTERN = {pattern_of(v): v for v in VECTORS}
SUPPORTED = [pytest.param(v, id=pattern_of(v)) for v in VECTORS if supported(pattern_of(v))]


def key(hex_text: str | None) -> KeyPair | None:
    return None if hex_text is None else KeyPair.from_private(bytes.fromhex(hex_text))


def raw(hex_text: str | None) -> bytes | None:
    return None if hex_text is None else bytes.fromhex(hex_text)


def side(vector: dict[str, Any], prefix: str) -> HandshakeState:
    return HandshakeState(
        pattern_of(vector),
        prefix == "init",
        prologue=bytes.fromhex(vector[f"{prefix}_prologue"]),
        s=key(vector.get(f"{prefix}_static")),
        e=key(vector.get(f"{prefix}_ephemeral")),
        rs=raw(vector.get(f"{prefix}_remote_static")),
        psks=[bytes.fromhex(p) for p in vector.get(f"{prefix}_psks", [])],
    )


def run_vector(vector: dict[str, Any]) -> None:
    init, resp = side(vector, "init"), side(vector, "resp")
    messages = vector["messages"]
    count = len(parse_pattern(pattern_of(vector))[1])
    assert len(messages) > count
    for i, message in enumerate(messages[:count]):
        sender, receiver = (init, resp) if i % 2 == 0 else (resp, init)
        payload = bytes.fromhex(message["payload"])
        ciphertext = sender.write_message(payload)
        assert ciphertext.hex() == message["ciphertext"], f"handshake message {i}"
        assert receiver.read_message(ciphertext) == payload
    assert init.finished and resp.finished
    assert init.handshake_hash.hex() == vector["handshake_hash"]
    assert resp.handshake_hash.hex() == vector["handshake_hash"]
    init_send, init_recv = init.split()
    resp_recv, resp_send = resp.split()
    for i, message in enumerate(messages[count:], start=count):
        # Transport messages continue the alternation; one-way patterns only send forwards.
        forward = count == 1 or i % 2 == 0
        send, recv = (init_send, resp_recv) if forward else (resp_send, init_recv)
        payload = bytes.fromhex(message["payload"])
        ciphertext = send.encrypt_with_ad(b"", payload)
        assert ciphertext.hex() == message["ciphertext"], f"transport message {i}"
        assert recv.decrypt_with_ad(b"", ciphertext) == payload


@pytest.mark.parametrize("vector", SUPPORTED)
def test_vector(vector: dict[str, Any]) -> None:
    run_vector(vector)


def test_required_vectors_are_present_supported_and_pass() -> None:
    assert set(BY_PATTERN) >= REQUIRED
    for pattern in sorted(REQUIRED):
        run_vector(BY_PATTERN[pattern])
    assert len(VECTORS) >= 59
    assert len(SUPPORTED) == len(VECTORS), "every pattern in the vector file is supported"


def test_pattern_table_is_well_formed() -> None:
    assert len(PATTERNS) == 38  # 3 one-way, 12 fundamental, 23 deferred
    for name in PATTERNS:
        pre, messages = parse_pattern(name)
        assert [sender for sender, _ in messages] == [i % 2 == 0 for i in range(len(messages))]
        assert all(set(tokens) <= {"e", "s"} for _, tokens in pre)
    assert parse_pattern("XXpsk3")[1][-1] == (True, ("s", "se", "psk"))
    assert parse_pattern("NNpsk0+psk2")[1] == [(True, ("psk", "e")), (False, ("e", "ee", "psk"))]
    for bad in ("ZZ", "XXpsk4", "XXpsk1+psk1", "xx", "XX psk3", ""):
        with pytest.raises(HandshakeError):
            parse_pattern(bad)


# ---------------------------------------------------------------------- helpers


def pair(seed: int) -> KeyPair:
    return KeyPair.from_private(hashlib.blake2b(bytes([seed]), digest_size=32).digest())


PSK = bytes(range(32))


def new_pair(pattern: str, seed: int = 0) -> tuple[HandshakeState, HandshakeState]:
    psks = [PSK] * pattern.count("psk")
    init_s, resp_s = pair(seed + 1), pair(seed + 2)
    pre = parse_pattern(pattern)[0]
    init_rs = resp_s.public if any(not sender for sender, _ in pre) else None
    resp_rs = init_s.public if any(sender for sender, _ in pre) else None
    init = HandshakeState(
        pattern, True, prologue=b"p", s=init_s, e=pair(seed + 3), rs=init_rs, psks=psks
    )
    resp = HandshakeState(
        pattern, False, prologue=b"p", s=resp_s, e=pair(seed + 4), rs=resp_rs, psks=psks
    )
    return init, resp


def handshake(
    init: HandshakeState,
    resp: HandshakeState,
    tamper: dict[int, Any] | None = None,
    start: int = 0,
) -> list[bytes]:
    """Run from message ``start`` to the end; ``tamper[i]`` rewrites message ``i`` in flight."""
    sent: list[bytes] = []
    tamper = tamper or {}
    while not (init.finished and resp.finished):
        i = start + len(sent)
        sender, receiver = (init, resp) if i % 2 == 0 else (resp, init)
        message = sender.write_message(b"payload %d" % i)
        sent.append(message)
        payload = receiver.read_message(tamper[i](message) if i in tamper else message)
        if not tamper:
            assert payload == b"payload %d" % i
    return sent


def flip(position: int) -> Any:
    return lambda m: m[:position] + bytes([m[position] ^ (1 << position % 8)]) + m[position + 1 :]


def lengths(pattern: str) -> list[int]:
    return [len(message) for message in handshake(*new_pair(pattern))]


# ----------------------------------------------------------------- hostile input


@pytest.mark.parametrize("pattern", ["NN", "XX", "XXpsk3", "IK", "NK1", "X"])
def test_every_flipped_bit_in_a_handshake_message_fails_the_handshake(pattern: str) -> None:
    for index, length in enumerate(lengths(pattern)):
        for position in range(length):
            init, resp = new_pair(pattern)
            with pytest.raises(HandshakeError):
                handshake(init, resp, {index: flip(position)})


def test_a_flip_is_caught_on_the_first_read_that_has_a_key() -> None:
    init, resp = new_pair("XX")
    message = init.write_message()
    resp.read_message(message)
    with pytest.raises(DecryptError):
        init.read_message(flip(40)(resp.write_message(b"hello")))
    with pytest.raises(HandshakeError, match="failed earlier"):
        init.read_message(message)


@pytest.mark.parametrize("pattern", ["NN", "XX", "XXpsk3", "IK", "N"])
def test_truncated_messages_raise_handshake_error(pattern: str) -> None:
    for index, length in enumerate(lengths(pattern)):
        for cut in range(length):
            init, resp = new_pair(pattern)
            with pytest.raises(HandshakeError):
                handshake(init, resp, {index: lambda m, cut=cut: m[:cut]})
    init, resp = new_pair("XX")
    init.write_message()
    with pytest.raises(HandshakeError, match="too short"):
        resp.read_message(b"\x01" * 31)


def test_messages_over_the_noise_limit_are_refused() -> None:
    init, resp = new_pair("XX")
    with pytest.raises(HandshakeError):
        init.write_message(bytes(MAX_MESSAGE - 31))
    with pytest.raises(HandshakeError):
        resp.read_message(bytes(MAX_MESSAGE + 1))
    init, resp = new_pair("NN")
    resp.read_message(init.write_message(bytes(MAX_MESSAGE - 32)))  # exactly the limit
    send = CipherState(bytes(32))
    with pytest.raises(HandshakeError):
        send.encrypt_with_ad(b"", bytes(MAX_MESSAGE - 15))
    with pytest.raises(HandshakeError):
        send.decrypt_with_ad(b"", bytes(MAX_MESSAGE + 1))
    assert len(send.encrypt_with_ad(b"", bytes(MAX_MESSAGE - 16))) == MAX_MESSAGE


def test_out_of_turn_calls_raise_handshake_error() -> None:
    init, resp = new_pair("XX")
    with pytest.raises(HandshakeError, match="turn"):
        resp.write_message()
    with pytest.raises(HandshakeError, match="turn"):
        init.read_message(bytes(48))
    first = init.write_message()
    with pytest.raises(HandshakeError, match="turn"):
        init.write_message()
    with pytest.raises(HandshakeError):
        init.split()
    resp.read_message(first)
    handshake(init, resp, start=1)
    for state in (init, resp):
        with pytest.raises(HandshakeError, match="finished"):
            state.write_message()
        with pytest.raises(HandshakeError, match="finished"):
            state.read_message(first)
    init.split()
    with pytest.raises(HandshakeError, match="once"):
        init.split()


def test_bad_construction_raises_handshake_error() -> None:
    s, e = pair(1), pair(2)
    with pytest.raises(HandshakeError, match="unknown"):
        HandshakeState("QQ", True, e=e)
    with pytest.raises(HandshakeError, match="'e'"):
        HandshakeState("NN", True)
    with pytest.raises(HandshakeError, match="'s'"):
        HandshakeState("XX", True, e=e)
    with pytest.raises(HandshakeError, match="remote 's'"):
        HandshakeState("XX", True, s=s, e=e, rs=pair(3).public)
    with pytest.raises(HandshakeError, match="remote 's'"):
        HandshakeState("IK", True, s=s, e=e)
    with pytest.raises(HandshakeError, match="psks"):
        HandshakeState("XXpsk3", True, s=s, e=e)
    with pytest.raises(HandshakeError, match="32 bytes"):
        HandshakeState("XXpsk3", True, s=s, e=e, psks=[b"short"])
    with pytest.raises(HandshakeError, match="32 bytes"):
        HandshakeState("NK", True, e=e, rs=b"\x09" * 31)
    with pytest.raises(HandshakeError, match="32 bytes"):
        KeyPair.from_private(b"\x01" * 33)
    with pytest.raises(HandshakeError, match="32 bytes"):
        KeyPair(b"\x01" * 31, s.public)
    assert issubclass(DecryptError, HandshakeError)
    assert issubclass(HandshakeError, P2PSyncError)
    assert repr(s.private) not in repr(s)  # the private key stays out of logs


def test_wrong_psk_or_prologue_is_detected() -> None:
    init, _ = new_pair("XXpsk3")
    resp = HandshakeState("XXpsk3", False, s=pair(2), e=pair(4), prologue=b"p", psks=[bytes(32)])
    resp.read_message(init.write_message())
    init.read_message(resp.write_message())
    with pytest.raises(DecryptError):
        resp.read_message(init.write_message())
    init, _ = new_pair("NN")
    resp = HandshakeState("NN", False, e=pair(4), prologue=b"q")
    resp.read_message(init.write_message())
    with pytest.raises(DecryptError):
        init.read_message(resp.write_message())


LOW_ORDER = [
    "00" * 32,
    "01" + "00" * 31,
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
    "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
    "ec" + "ff" * 30 + "7f",
    "ed" + "ff" * 30 + "7f",
    "ee" + "ff" * 30 + "7f",
]


@pytest.mark.parametrize("point", LOW_ORDER)
def test_low_order_remote_ephemeral_is_refused(point: str) -> None:
    init, resp = new_pair("XX")
    resp.read_message(init.write_message())
    genuine = resp.write_message()
    with pytest.raises(HandshakeError, match="low-order"):
        init.read_message(bytes.fromhex(point) + genuine[32:])
    init, resp = new_pair("NN")
    init.write_message()
    resp.read_message(bytes.fromhex(point))
    with pytest.raises(HandshakeError, match="low-order"):
        resp.write_message()


# -------------------------------------------------------------------- transport


def transport(pattern: str = "XX") -> tuple[CipherState, CipherState, CipherState, CipherState]:
    """Return (initiator send, initiator receive, responder send, responder receive)."""
    init, resp = new_pair(pattern)
    handshake(init, resp)
    (init_c1, init_c2), (resp_c1, resp_c2) = init.split(), resp.split()
    return init_c1, init_c2, resp_c2, resp_c1


def test_split_returns_c1_c2_in_spec_order_on_both_sides() -> None:
    init, resp = new_pair("XX")
    handshake(init, resp)
    (init_c1, init_c2), (resp_c1, resp_c2) = init.split(), resp.split()
    assert init_c1.key == resp_c1.key and init_c2.key == resp_c2.key
    assert init_c1.key != init_c2.key and init_c1.key is not None
    assert len(init_c1.key) == 32 and init_c1.nonce == 0


def test_each_direction_has_its_own_key() -> None:
    init_send, init_recv, resp_send, resp_recv = transport()
    message = init_send.encrypt_with_ad(b"", b"to resp")
    with pytest.raises(DecryptError):
        init_recv.decrypt_with_ad(b"", message)  # reflected back at its sender
    assert resp_recv.decrypt_with_ad(b"", message) == b"to resp"
    assert init_recv.decrypt_with_ad(b"", resp_send.encrypt_with_ad(b"", b"to init")) == b"to init"


def test_nonce_increments_and_ciphertexts_never_repeat() -> None:
    send, _, _, recv = transport()
    seen = set()
    for n in range(50):
        assert send.nonce == n
        ciphertext = send.encrypt_with_ad(b"", b"same")
        assert ciphertext not in seen
        seen.add(ciphertext)
        assert recv.decrypt_with_ad(b"", ciphertext) == b"same"
        assert recv.nonce == n + 1


def test_replayed_reordered_or_flipped_transport_messages_fail() -> None:
    send, _, _, recv = transport()
    first, second, third = (send.encrypt_with_ad(b"ad", b"m%d" % i) for i in range(3))
    assert recv.decrypt_with_ad(b"ad", first) == b"m0"
    with pytest.raises(DecryptError):
        recv.decrypt_with_ad(b"ad", first)  # replay
    with pytest.raises(DecryptError):
        recv.decrypt_with_ad(b"ad", third)  # reorder
    with pytest.raises(DecryptError):
        recv.decrypt_with_ad(b"other", second)  # wrong associated data
    for position in range(len(second)):
        with pytest.raises(DecryptError):
            recv.decrypt_with_ad(b"ad", flip(position)(second))
    with pytest.raises(DecryptError):
        recv.decrypt_with_ad(b"ad", second[:15])
    assert recv.nonce == 1  # failures do not advance the nonce
    assert recv.decrypt_with_ad(b"ad", second) == b"m1"


def test_the_reserved_nonce_is_never_used() -> None:
    send = CipherState(bytes(32), nonce=2**64 - 3)
    recv = CipherState(bytes(32), nonce=2**64 - 3)
    for _ in range(2):
        recv.decrypt_with_ad(b"", send.encrypt_with_ad(b"", b"x"))
    assert send.nonce == 2**64 - 1
    with pytest.raises(HandshakeError, match="exhausted"):
        send.encrypt_with_ad(b"", b"x")
    with pytest.raises(HandshakeError, match="exhausted"):
        recv.decrypt_with_ad(b"", bytes(16))
    with pytest.raises(HandshakeError):
        CipherState(bytes(32), nonce=2**64)


def test_rekey_changes_the_key_on_both_sides() -> None:
    send, _, _, recv = transport()
    recv.decrypt_with_ad(b"", send.encrypt_with_ad(b"", b"before"))
    send.rekey()
    message = send.encrypt_with_ad(b"", b"after")
    with pytest.raises(DecryptError):
        recv.decrypt_with_ad(b"", message)
    recv.rekey()
    assert recv.decrypt_with_ad(b"", message) == b"after"
    assert send.nonce == recv.nonce == 2  # rekey keeps the nonce
    with pytest.raises(HandshakeError):
        CipherState().rekey()


@settings(max_examples=30, deadline=None)
@given(
    seeds=st.lists(st.binary(min_size=32, max_size=32), min_size=4, max_size=4),
    prologue=st.binary(max_size=64),
    handshake_payloads=st.lists(st.binary(max_size=300), min_size=3, max_size=3),
    forward=st.lists(st.binary(max_size=2000), min_size=20, max_size=20),
    backward=st.lists(st.binary(max_size=2000), min_size=20, max_size=20),
)
def test_xx_round_trip(
    seeds: list[bytes],
    prologue: bytes,
    handshake_payloads: list[bytes],
    forward: list[bytes],
    backward: list[bytes],
) -> None:
    init_s, init_e, resp_s, resp_e = (KeyPair.from_private(seed) for seed in seeds)
    init = HandshakeState("XX", True, prologue=prologue, s=init_s, e=init_e)
    resp = HandshakeState("XX", False, prologue=prologue, s=resp_s, e=resp_e)
    for i, payload in enumerate(handshake_payloads):
        sender, receiver = (init, resp) if i % 2 == 0 else (resp, init)
        assert receiver.read_message(sender.write_message(payload)) == payload
    assert init.finished and resp.finished
    assert init.handshake_hash == resp.handshake_hash
    assert init.remote_static == resp_s.public and resp.remote_static == init_s.public
    init_send, init_recv = init.split()
    resp_recv, resp_send = resp.split()
    for there, back in zip(forward, backward, strict=True):
        assert resp_recv.decrypt_with_ad(b"", init_send.encrypt_with_ad(b"", there)) == there
        assert init_recv.decrypt_with_ad(b"", resp_send.encrypt_with_ad(b"", back)) == back
    assert init_send.nonce == resp_recv.nonce == 20
