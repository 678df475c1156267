"""The relay node: admission, sessions and the blind mailbox it serves (``docs/relay.md``)."""
