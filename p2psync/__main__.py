"""``python -m p2psync``: the command line."""

from p2psync.cli.main import main

main()
