"""The flow policy: what may go to one peer and what from it may be accepted.

One pure object answers, for one peer, one route and the rules in force between
us, the three questions every way of syncing asks (the live session, ``p2psync
sync`` and the relay's mailbox alike):

* **what the peer lacks** — per author, the entries after the seq the peer is
  known to hold (nothing of an author it froze after a fork: it would refuse them);
* **what goes of each entry** — the signed part always (the receiver verifies
  the chain), the payloads only of collections a rule lets us send (the others
  are withheld: ``null``, see ``docs/entry-format.md`` §3.4);
* **what may be accepted** — an entry carrying a payload no rule lets the peer
  send here is refused (the peer broke the rules); an entry missing a payload we
  may receive, now or by another way the peer's entries come here (an on-demand
  rule while live, the other path: direct or relay) that would bring it with all
  this copy carries, waits: applying it without would lose that payload for good.

Rules apply by route: a direct connection (live or on demand) carries the rules
in force whose route is ``direct`` or ``auto``; the relay's mailbox only those
whose route is ``relay`` or ``auto`` (``DESIGN.md`` §7: its mailbox policy). In a
live session, rules count only if one of them is online (``Permissions.between``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from p2psync.core.entry import Entry, withhold
from p2psync.core.identity import short_id
from p2psync.core.messages import Head
from p2psync.core.rules import Permissions, Route, Rule, Terms
from p2psync.errors import EntryError, RuleViolationError, WithheldError

#: Collection names whose verdict a flow remembers; a peer names as many as it likes,
#: so past this the memo starts afresh.
MAX_REMEMBERED = 1024

#: Everything, both ways: what a connection without rules (a bare protocol test)
#: may exchange.
EVERYTHING = Permissions(send=(Terms(),), receive=(Terms(),))


def _whole(terms: tuple[Terms, ...]) -> bool:
    return any(t.collections == ("*",) for t in terms)


@dataclass(frozen=True)
class Flow:
    """What flows between this site and one peer on one route.

    ``now``: the rules in force for this route and session. ``later``: the other
    ways the peer's entries come here, each as what its rules let come by it (a
    direct connection on demand, when a live session carries nothing yet; the relay
    on a direct connection; a direct connection in the mailbox): an entry missing a
    payload one of them would bring, with everything this copy carries, waits for
    that copy rather than lose the payload.
    """

    now: Permissions = EVERYTHING
    later: tuple[Permissions, ...] = ()
    #: a rule is in force between us at all, whatever this session carries (None:
    #: whether ``now`` lets anything flow)
    any_rule: bool | None = None
    _receivable: dict[str, bool] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def between(
        cls,
        me: bytes,
        peer: bytes,
        rules: Sequence[Rule],
        *,
        live: bool,
        via_relay: bool = False,
    ) -> Flow:
        """The flow set by ``rules`` (any rule objects about the pair; only those in
        force count) for a live or on-demand direct session, or the relay."""
        # A rule's route says which paths carry it: ``relay`` only the relay,
        # ``direct`` only a direct connection, ``auto`` both.
        if via_relay:
            carried = [r for r in rules if r.terms.route in (Route.RELAY, Route.AUTO)]
        else:
            carried = [r for r in rules if r.terms.route in (Route.DIRECT, Route.AUTO)]
        now = Permissions.between(me, peer, carried, live=live)
        # every way the peer's entries may come here: a direct connection (on
        # demand: all its rules) and the relay; those that let something come that
        # this session does not are where an entry missing a payload may get it
        paths = [
            Permissions.between(me, peer, [r for r in rules if r.terms.route in routes],
                                live=False)
            for routes in ((Route.DIRECT, Route.AUTO), (Route.RELAY, Route.AUTO))
        ]
        later = tuple(p for p in paths if p.receive and p.receive != now.receive)
        # rules in force only by the other path: paired, with nothing to do here
        # (the session ends at once, saying so, rather than wait for a pairing)
        return cls(now, later, any(p.paired for p in paths))

    # ------------------------------------------------------------ in general

    @property
    def flows(self) -> bool:
        """A rule in force for this session lets something flow, one way or the
        other (in a live session, only if one of the pair's rules is online)."""
        return self.now.paired

    @property
    def in_force(self) -> bool:
        """A rule is in force between us, online or on demand."""
        return self.now.paired if self.any_rule is None else self.any_rule

    @property
    def sending(self) -> bool:
        return bool(self.now.send)

    @property
    def receiving(self) -> bool:
        return bool(self.now.receive)

    # ------------------------------------------------------------ what goes

    def lacks(self, local: Mapping[bytes, Head], peer: Mapping[bytes, Head]) -> dict[bytes, int]:
        """Per author, the seq after which ``peer`` lacks entries we hold and may
        send it (none if no rule lets us send; none of an author it froze)."""
        if not self.now.send:
            return {}
        wanted = {}
        for author, head in local.items():
            theirs = peer.get(author)
            if theirs is not None and theirs.frozen:
                continue
            have = theirs.seq if theirs is not None else 0
            if head.seq > have:
                wanted[author] = have
        return wanted

    def outgoing(self, wires: list[bytes]) -> list[bytes]:
        """The wire forms to send: payloads of collections no rule lets us send to
        the peer withheld. (Only call it when :attr:`sending`.)"""
        if _whole(self.now.send):
            return wires
        return [withhold(wire, self.now.may_send) for wire in wires]

    # ------------------------------------------------------------ what comes

    def may_receive(self, collection: str) -> bool:
        """A rule in force for this session lets the peer send ``collection`` here."""
        memo = self._receivable
        allowed = memo.get(collection)
        if allowed is None:
            if len(memo) >= MAX_REMEMBERED:
                memo.clear()
            allowed = memo[collection] = self.now.may_receive(collection)
        return allowed

    def judge(self, entry: Entry) -> EntryError | None:
        """Why a received (decoded) ``entry`` may not be applied now, if it may not.

        :class:`RuleViolationError` — it carries a payload no rule lets the peer send
        here: the peer's fault. :class:`WithheldError` — it lacks a payload we may
        receive now or later: not the peer's fault (it may never have had it), the
        entry waits. ``None``: it may be applied."""
        everything = _whole(self.now.receive)
        if everything and None not in entry.ops:
            return None
        withheld: list[str] = []
        for collection, op in zip(entry.collections, entry.ops, strict=True):
            allowed = everything or self.may_receive(collection)
            if op is not None:
                if not allowed and not self._later(collection):
                    return RuleViolationError(
                        f"carries the payload of an op in {collection!r}, which no "
                        "rule lets it send here"
                    )
            elif allowed:
                withheld.append(collection)
        if withheld:
            author, missing = short_id(entry.author), withheld[0]
            # applying it without those ops would lose them for good: a later full
            # copy has the same ID and counts as a duplicate. Not the sender's fault
            # when it never had them (filtered before they reached it).
            return WithheldError(
                f"it reached the sender without its {missing!r} part (a rule on its "
                f"way from {author} leaves {missing!r} out), but {missing!r} may "
                f"come here from the sender, and applying it without that part would lose "
                f"it; it waits here, with {author}'s later entries. To go on: let the "
                f"sender receive {missing!r} from {author}, or pair with {author} (or "
                f"another peer holding its entries in full) for {missing!r}; or, if "
                f"this site needs no {missing!r} from the sender, leave it out of the "
                "rule with the sender"
            )
        later = self._better_copy(entry)
        if later is not None:
            return WithheldError(
                f"it holds changes to {later!r}, which the rules with the sender "
                f"carry only on demand or only by the other path (direct or relay); it waits "
                f"here, with {short_id(entry.author)}'s later entries, until they come that "
                "way (p2psync sync, or the relay)"
            )
        return None

    def _later(self, collection: str) -> bool:
        return any(path.may_receive(collection) for path in self.later)

    def _better_copy(self, entry: Entry) -> str | None:
        """A collection whose payload ``entry`` lacks and another way would bring,
        with every payload this copy has: the entry waits for that copy. When no
        single way brings more (a relay-only and a direct-only collection in one
        entry), the copy is applied as it is; the part it lacks cannot come whole by
        any one path (docs/relay.md, Mixed routes)."""
        if not self.later:
            return None
        present = [c for c, op in zip(entry.collections, entry.ops, strict=True)
                   if op is not None]
        absent = [c for c, op in zip(entry.collections, entry.ops, strict=True) if op is None]
        for path in self.later:
            if not all(path.may_receive(c) for c in present):
                continue
            for collection in absent:
                if path.may_receive(collection):
                    return collection
        return None
