"""How the rule objects about a pair settle in one session (``docs/protocol.md``
§5): both sides name what they hold (``RulesHeld``), send it all when the digests
differ (``Rules``), answer with what the objects received call for, and a
joiner presents its invite code (``Join``). Part of the session machine: it
returns the messages to send and raises :class:`RemoteProtocolError` for the peer's
faults; the machine queues and closes."""

from __future__ import annotations

from collections.abc import Sequence

from p2psync.core.messages import Join, Message, Rules, RulesHeld, rules_digest
from p2psync.errors import RemoteProtocolError

#: RulesHeld messages a session may carry before its rule objects must have settled.
MAX_RULES_HELD = 4
#: Rule messages (Rules, RulesHeld, Join) handed to the shell and not yet answered.
MAX_RULE_WORK = 9


class RuleExchange:
    """The rule objects' side of one session."""

    def __init__(
        self, objects: Sequence[bytes], *, on_demand: bool, join: tuple[bytes, bytes] | None
    ) -> None:
        self.held_digest = rules_digest(objects)  # what our own RulesHeld carried
        self.sent_digest = self.held_digest  # our objects as last sent or announced
        self.on_demand = on_demand
        self.join = join
        self.joining = join is not None  # our invite code is not answered yet
        self.settled = False  # both sides hold the same rule objects
        self._held_received = 0
        self._work = 0

    def opening(self) -> list[Message]:
        """Our first messages."""
        first: list[Message] = [RulesHeld(self.held_digest, self.on_demand)]
        if self.join is not None:
            first.append(Join(*self.join))
        return first

    def peer_message(self, held: bool = False) -> None:
        """The peer sent a rule message (``held``: a RulesHeld), for the shell."""
        self._work += 1
        if self._work > MAX_RULE_WORK:
            raise RemoteProtocolError("too many rule messages at once")
        if held:
            self._held_received += 1
            if self._held_received > MAX_RULES_HELD:
                raise RemoteProtocolError("the rule objects of this pair do not settle")

    def held_answered(self, digest: bytes, ours: Sequence[bytes]) -> tuple[bool, list[Message]]:
        """Our objects, read after the peer's RulesHeld named ``digest``: whether the
        peer holds exactly what we hold, and what to send it."""
        self._work -= 1
        same = rules_digest(ours) == digest
        if same:
            self.settled = True
        if same and self.held_digest == digest:
            return True, []
        # when the same: our own RulesHeld named objects we held then, not now; the
        # peer compares it with what it holds, finds a difference, and settles only
        # on our Rules
        return same, self._all(ours)

    def stored(self, answers: Sequence[bytes], *, join_answered: bool) -> list[Message]:
        """The peer's objects are stored: we hold the union now; ``answers`` go back."""
        self._work -= 1
        self.settled = True
        if join_answered:
            self.joining = False
        return [Rules(list(answers))] if answers else []

    def join_answered(self, proposal: bytes) -> list[Message]:
        """The joiner's code checked out: our proposal goes to it."""
        self._work -= 1
        return [Rules([proposal])]

    def changed(self, ours: Sequence[bytes]) -> list[Message]:
        """Our objects about the pair changed: all of them go, if not sent already."""
        return [] if rules_digest(ours) == self.sent_digest else self._all(ours)

    def _all(self, ours: Sequence[bytes]) -> list[Message]:
        self.sent_digest = rules_digest(ours)
        return [Rules(list(ours))]
