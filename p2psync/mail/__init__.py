"""The agent's side of the relay mailbox (DESIGN §7, ``docs/relay.md``): it makes and
consumes *wire envelopes* (bytes) and records what happened to them, whatever
carries them (the relay client, or a bundle file handed over by hand).

* :mod:`p2psync.mail.outbox` — what a peer lacks and may see, packed into bundles,
  sealed, numbered and recorded as queued; owed receipts.
* :mod:`p2psync.mail.inbox` — opening what arrives: deduplicated, judged by the same
  flow policy as a live session, applied through the normal ingest path, answered
  by a receipt; receipts mark the ledger.
* :mod:`p2psync.mail.mailer` — :class:`~p2psync.mail.mailer.Mailer`, the one object
  callers use: the two above plus the ledger's moves (deposited, refused, expired,
  superseded), gaps and the signed mailbox policy.
* :mod:`p2psync.mail.files` — bundle files (``p2psync bundle export/import``).
"""
