"""What the CLI and the HTTP API say about this site, as plain data: one place that
decides each figure, so a terminal, a script and the web console never disagree.
The CLI words them (``p2psync.cli``); the HTTP API sends them as JSON
(``p2psync.http``)."""
