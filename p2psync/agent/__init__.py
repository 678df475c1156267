"""The agent: one process per home that listens, dials its peers and keeps them in sync."""
