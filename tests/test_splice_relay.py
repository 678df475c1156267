"""The relay node's live splice against hostile agents (issue 11), with a real
relay process and agents' relay clients in this process (127.0.0.1 only).

The relay invites only a peer that is connected and lists the asker on its
mailbox policy, and answers everything else the same way; a key is good once,
for its own device; floods of requests are cut to a rate and change nothing for
others."""

from __future__ import annotations

import os

import pytest
import trio

from p2psync.clock import now_ms
from p2psync.core import relaywire as wire
from p2psync.core.identity import Identity, parse_device_id
from p2psync.core.policy import sign_policy
from p2psync.errors import RelayUnavailable
from p2psync.net.relayclient import RelayClient, open_relay
from p2psync.net.splice import join_splice
from p2psync.relay.splice import KEY_SECONDS, Splices
from p2psync.store.relays import Relay
from tests.relaynode import RelayNode

UNAVAILABLE = (wire.RefusalCode.UNAVAILABLE, "unavailable")


def target(relay: RelayNode) -> Relay:
    return Relay(parse_device_id(relay.device_id), (relay.address,))


async def allow(client: RelayClient, identity: Identity, *senders: Identity) -> None:
    signed = sign_policy(identity, 1, [s.public_key for s in senders], now_ms())
    assert isinstance(await client.set_policy(signed), wire.Done)


def refusal(answer: wire.Message) -> tuple[wire.RefusalCode, str] | None:
    return (answer.code, answer.detail) if isinstance(answer, wire.Refused) else None


@pytest.mark.process
async def test_unavailable_is_one_answer_whoever_is_asked_for(
    splice_relay: tuple[RelayNode, dict[str, Identity]],
) -> None:
    """Unknown, offline, not allowing the asker, or the asker itself: the same
    answer; only a connected peer that lists the asker gets an invitation."""
    relay, who = splice_relay
    async with (
        open_relay(who["a"], "a", target(relay)) as a,
        open_relay(who["b"], "b", target(relay)) as b,
        open_relay(who["c"], "c", target(relay)) as c,
    ):
        await allow(b, who["b"], who["a"])
        await allow(c, who["c"], who["d"])  # c lets d splice, not a
        for peer in (os.urandom(32), who["d"].public_key, who["c"].public_key, who["a"].public_key):
            assert refusal(await a.connect(peer)) == UNAVAILABLE
        answer = await a.connect(who["b"].public_key)
        assert isinstance(answer, wire.Invitation) and answer.peer == who["b"].public_key
        with trio.fail_after(5):
            invited = await b.next_invitation()
        assert invited.peer == who["a"].public_key and invited.key != answer.key
        del c


@pytest.mark.process
async def test_a_stolen_or_replayed_key_is_refused_and_changes_nothing(
    splice_relay: tuple[RelayNode, dict[str, Identity]],
) -> None:
    relay, who = splice_relay
    spot = target(relay)
    async with (
        open_relay(who["a"], "a", spot) as a,
        open_relay(who["b"], "b", spot) as b,
    ):
        await allow(b, who["b"], who["a"])
        invitation = await a.connect(who["b"].public_key)
        assert isinstance(invitation, wire.Invitation)
        with trio.fail_after(5):
            invited = await b.next_invitation()
        # c overheard a's key (or b's): presented from another device, it is refused
        for stolen in (invitation.key, invited.key):
            with pytest.raises(RelayUnavailable, match="unavailable"):
                await join_splice(
                    who["c"], "c", spot.key, relay.address, stolen, who["b"].public_key, wait=5
                )
        # b presenting a's key is refused too: each key is its own device's
        with pytest.raises(RelayUnavailable, match="unavailable"):
            await join_splice(
                who["b"], "b", spot.key, relay.address, invitation.key, who["a"].public_key,
                wait=5,
            )
        # the rightful holders still splice, and bytes flow both ways untouched
        streams: dict[str, trio.abc.Stream] = {}

        async def join(name: str, key: bytes, peer: Identity) -> None:
            streams[name] = await join_splice(
                who[name], name, spot.key, relay.address, key, peer.public_key, wait=5
            )

        async with trio.open_nursery() as nursery:
            nursery.start_soon(join, "a", invitation.key, who["b"])
            nursery.start_soon(join, "b", invited.key, who["a"])
        await streams["a"].send_all(b"hello b")
        await streams["b"].send_all(b"hello a")
        assert await read(streams["b"], 7) == b"hello b"
        assert await read(streams["a"], 7) == b"hello a"
        # used once: presented again (by its own device) it is refused
        with pytest.raises(RelayUnavailable, match="unavailable"):
            await join_splice(
                who["a"], "a", spot.key, relay.address, invitation.key, who["b"].public_key,
                wait=5,
            )
        with trio.fail_after(5):  # the state file is written each second
            while relay.status()["running"]["splice_counters"]["refused_joins"] != 4:
                await trio.sleep(0.2)
        for stream in streams.values():
            await stream.aclose()


async def read(stream: trio.abc.Stream, size: int, timeout: float = 5) -> bytes:
    data = b""
    with trio.fail_after(timeout):
        while len(data) < size:
            chunk = await stream.receive_some(size - len(data))
            assert chunk, "the splice closed"
            data += chunk
    return data


@pytest.mark.process
async def test_a_flood_of_splice_requests_is_cut_and_others_are_served(
    splice_relay: tuple[RelayNode, dict[str, Identity]],
) -> None:
    """A paired agent asks for a splice hundreds of times: beyond a short burst it
    is answered "unavailable" at once, the invitations its peer receives stay
    few, and the relay goes on serving everyone (the flooder's peer included)."""
    relay, who = splice_relay
    spot = target(relay)
    async with (
        open_relay(who["a"], "a", spot) as a,
        open_relay(who["b"], "b", spot) as b,
    ):
        await allow(a, who["a"], who["b"])
        await allow(b, who["b"], who["a"])
        answers = []
        with trio.fail_after(20):
            for _ in range(300):
                answers.append(await a.connect(who["b"].public_key))
        invited = sum(isinstance(x, wire.Invitation) for x in answers)
        assert 1 <= invited <= 12, invited  # the burst, and the per-device cap
        assert all(refusal(x) == UNAVAILABLE for x in answers if not isinstance(x, wire.Invitation))
        # b, flooded with invitations, still has a working session of its own
        with trio.fail_after(10):
            answer = await b.connect(who["a"].public_key)
        assert isinstance(answer, wire.Invitation) or refusal(answer) == UNAVAILABLE
        assert isinstance(await b.fetch(0), wire.Envelopes)
    async with open_relay(who["c"], "c", spot) as c:  # a newcomer is served at once
        with trio.fail_after(5):
            assert isinstance(await c.fetch(0), wire.Envelopes)


@pytest.mark.pure
def test_a_key_is_good_once_for_its_device_until_it_expires() -> None:
    splices = Splices(per_device=2, total=8)
    a, b, c = b"a" * 32, b"b" * 32, b"c" * 32
    invitation = splices.invite(a, b, 100.0)
    assert invitation is not None
    key_a, key_b = splices.key_of(invitation, a), splices.key_of(invitation, b)
    assert splices.claim(key_a, c, 100.0) is None  # another device
    assert splices.claim(key_a, a, 100.0 + KEY_SECONDS) is None  # late
    late = splices.invite(a, b, 200.0)
    assert late is not None
    assert splices.claim(splices.key_of(late, b), b, 200.0) is late
    assert splices.claim(splices.key_of(late, b), b, 200.0) is None  # again
    assert splices.invite(a, a, 200.0) is None  # with itself
    del key_b


@pytest.mark.pure
def test_invitations_are_capped_per_device_and_in_all() -> None:
    splices = Splices(per_device=2, total=3)
    a, b, c, d = (bytes([n]) * 32 for n in range(4))
    assert splices.invite(a, b, 0.0) and splices.invite(a, b, 0.0)
    assert splices.invite(a, b, 0.0) is None  # a has two waiting
    assert splices.invite(c, d, 0.0)
    assert splices.invite(d, c, 0.0) is None  # three in all
    assert splices.invite(c, d, KEY_SECONDS + 1) is not None  # the old ones expired
