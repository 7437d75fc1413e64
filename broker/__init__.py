"""The splitpilot broker: the central job queue and matcher (gRPC over mTLS).

- `broker.lifecycle`: the one table of legal transitions (the states are pilot.api.states);
- `broker.store`: persistence and matching (SQLite by default, PostgreSQL);
- `broker.files`: the content-addressed sandbox store (name rules: pilot.api.files);
- `broker.ca`, `broker.tokens_cli`: the internal CA, `splitpilot ca ...` and `splitpilot token ...`;
- `broker.services` (base, user, agent, job, admin), `broker.server`: the gRPC services, TLS and authorisation;
- `broker.cli`: `splitpilot broker ...` and `splitpilot job ...`.
"""
