"""The agent's local HTTP API and web console (``docs/http-api.md``).

Starlette, run on trio (through anyio) and served by Hypercorn's trio worker in
the agent's own nursery: the API reads and writes the same store as the agent's
sessions and is woken by the agent's own change signals. Every request needs the
site's API key (``HOME/http.key``) and a ``Host`` that cannot be a rebound name.
"""
