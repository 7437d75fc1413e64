"""Broker persistence: the JobStore interface and its SQLite and PostgreSQL stores.

    store = open_store("sqlite:///var/lib/splitpilot/broker.db", StoreSettings())
    store = open_store("postgresql://broker@db.example.org/splitpilot", StoreSettings())

`broker.store.base` is the contract; `broker.store.sql` the logic both
stores share; `broker.store.sqlite` and `broker.store.postgres` the two
backends (psycopg is imported only when a PostgreSQL URL is opened).
"""

from __future__ import annotations

from broker.store.base import JobStore, StoreSettings
from broker.store.sqlite import SqliteStore
from pilot.errors import UsageError

__all__ = ["JobStore", "StoreSettings", "open_store"]


def open_store(url: str, settings: StoreSettings | None = None) -> JobStore:
    """Open (creating if needed) the store at URL.

    `sqlite:///abs/path.db`, `sqlite:relative/path.db` or a plain file path:
    the embedded SQLite store. `postgresql://...` (or `postgres://`): a
    PostgreSQL database, which several brokers may share.
    """
    settings = settings or StoreSettings()
    scheme, sep, rest = url.partition(":")
    if sep and scheme in ("postgresql", "postgres"):
        try:
            from broker.store.postgres import PostgresStore  # why: psycopg (the broker extra)
        except ImportError as exc:  # psycopg missing
            raise UsageError(f"a PostgreSQL store needs psycopg ({exc}); fix: pip install 'psycopg[binary]>=3.2'"
                             ) from exc
        return PostgresStore(url, settings)
    if sep and scheme == "sqlite":
        path = ("/" + rest.lstrip("/") if rest.strip("/") else "") if rest.startswith("//") else rest
    elif sep and "/" not in scheme and len(scheme) > 1:
        raise UsageError(f"store URL {url!r}: unknown scheme {scheme!r}; fix: use sqlite:///path/to/file.db, "
                         "a file path, or postgresql://user@host/database")
    else:
        path = url
    if not path or path == ":memory:":
        raise UsageError(f"store URL {url!r} names no file; fix: sqlite:///path/to/file.db")
    return SqliteStore(path, settings)
