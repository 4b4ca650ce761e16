"""Run SQLite work off the event loop, with group commit for writes.

One writer thread owns the write connection; concurrent ``write`` calls that arrive
while a transaction commits are run together in the next transaction, so one fsync
covers many callers (durable before ack without one fsync per envelope). Reads use a
second connection on a second thread (WAL mode lets them run beside the writer).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from relay.errors import Unavailable
from relay.resource import AsyncResource

T = TypeVar("T")
Txn = Callable[[sqlite3.Connection], Any]

#: Most writes committed in one transaction.
MAX_GROUP = 512


def connect(path: Path) -> sqlite3.Connection:
    """Open ``path`` in WAL mode with full fsync on commit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=10000")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


class SqliteWorker(AsyncResource):
    """Async access to one SQLite file: ``read`` and group-committed ``write``."""

    def __init__(self, path: Path, schema: str) -> None:
        self._path = path
        self._schema = schema
        self._writer = ThreadPoolExecutor(1, thread_name_prefix=f"sqlite-w-{path.name}")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix=f"sqlite-r-{path.name}")
        self._wconn: sqlite3.Connection | None = None
        self._rconn: sqlite3.Connection | None = None
        self._pending: list[tuple[Txn, asyncio.Future[Any]]] = []
        self._flush_task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        """Open both connections and apply the schema (idempotent DDL)."""
        loop = asyncio.get_running_loop()

        def _open_writer() -> sqlite3.Connection:
            conn = connect(self._path)
            conn.executescript(self._schema)
            return conn

        self._wconn = await loop.run_in_executor(self._writer, _open_writer)
        self._rconn = await loop.run_in_executor(self._reader, lambda: connect(self._path))

    async def close(self) -> None:
        """Finish pending writes and close the connections."""
        if self._flush_task is not None:
            await self._flush_task
        loop = asyncio.get_running_loop()
        if self._wconn is not None:
            await loop.run_in_executor(self._writer, self._wconn.close)
            self._wconn = None
        if self._rconn is not None:
            await loop.run_in_executor(self._reader, self._rconn.close)
            self._rconn = None
        self._writer.shutdown(wait=True)
        self._reader.shutdown(wait=True)

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` with the read connection on the reader thread."""
        conn = self._rconn
        if conn is None:
            raise Unavailable(f"store {self._path.name} is closed")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._reader, fn, conn)
        except sqlite3.OperationalError as exc:
            raise Unavailable(f"store {self._path.name}: {exc}") from exc

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` inside a write transaction shared with concurrent writers.

        Returns once the transaction holding ``fn`` has committed (and been fsync'd).
        ``fn`` must not commit; an exception in ``fn`` fails only its own caller (its
        changes are rolled back to a savepoint), never the others in the group.
        """
        if self._wconn is None:
            raise Unavailable(f"store {self._path.name} is closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._pending.append((fn, fut))
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = loop.create_task(self._flush())
        return await fut

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            group, self._pending = self._pending[:MAX_GROUP], self._pending[MAX_GROUP:]
            try:
                results = await loop.run_in_executor(self._writer, self._commit, group)
            except sqlite3.Error as exc:
                err = Unavailable(f"store {self._path.name}: {exc}")
                for _, fut in group:
                    if not fut.done():
                        fut.set_exception(err)
                continue
            for (_, fut), (ok, value) in zip(group, results, strict=True):
                if fut.done():
                    continue
                if ok:
                    fut.set_result(value)
                else:
                    fut.set_exception(value)

    def _commit(self, group: list[tuple[Txn, asyncio.Future[Any]]]) -> list[tuple[bool, Any]]:
        conn = self._wconn
        assert conn is not None
        results: list[tuple[bool, Any]] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for fn, _ in group:
                conn.execute("SAVEPOINT op")
                try:
                    results.append((True, fn(conn)))
                    conn.execute("RELEASE op")
                except Exception as exc:  # handed to that caller alone
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    results.append((False, exc))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return results
