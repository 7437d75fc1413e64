"""Broker persistence: the JobStore interface and its SQLite and PostgreSQL stores."""
