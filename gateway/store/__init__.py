"""Persistence: one store port (:class:`Store`), two adapters (SQLite default, PostgreSQL scale-out)."""
from .base import CreditResult, Store, StoreError


def open_store(url: str) -> Store:
    """``sqlite:///path/to/feikong.db`` (or a bare path) or ``postgresql://user@host/db``."""
    if url.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresStore

        return PostgresStore(url)
    if url.startswith("sqlite://"):
        url = url.removeprefix("sqlite://")  # sqlite:///var/lib/feikong.db -> /var/lib/feikong.db
    if not url or "://" in url:
        raise ValueError(f"store url {url!r}: use sqlite:///PATH or postgresql://USER@HOST/DB")
    from .sqlite import SqliteStore

    return SqliteStore(url)


__all__ = ["Store", "StoreError", "CreditResult", "open_store"]
