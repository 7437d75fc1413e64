"""The splitpilot broker: the central job queue and matcher (gRPC over mTLS).

- `broker.lifecycle`: job states and the one table of legal transitions;
- `broker.store`: persistence and matching (SQLite by default, PostgreSQL);
- `broker.files`: the content-addressed sandbox store;
- `broker.service`, `broker.server`: the gRPC services, TLS and authorisation;
- `broker.client`: the Python API for users, agents and wrappers;
- `broker.cli`: `splitpilot broker ...` and `splitpilot job ...`.
"""
