"""Versioned CQL migrations: ``relayd migrate`` (apply) and ``relayd migrate --status``.

Migrations are the package files ``migrations/NNNN_name.cql``, applied in version
order. A file holds CQL statements, each ending with ``;`` at the end of a line; lines
starting with ``--`` are comments. Statements are written to be safe to run twice
(``IF NOT EXISTS``), so a migration interrupted half-way is simply applied again.

``migrate`` creates the keyspace if it is missing (NetworkTopologyStrategy with
``replication_factor`` replicas in ``local_dc``; SimpleStrategy if ``local_dc`` is
empty), then applies every migration not yet recorded in ``schema_migrations`` and
records it. Running it again applies nothing. A migration may have a data step in
Python, run after its statements and before it is recorded (``_AFTER``): 0005 notes
whether layout-1 message ids exist at all (``ids.after_migration``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources

from relay.common.cassandra.session import CassandraSession
from relay.config import CassandraConfig, ConfigError
from relay.stores.cassandra import ids

#: Data steps run after a migration's statements (by version), before it is recorded.
_AFTER: dict[str, Callable[[CassandraSession], Awaitable[None]]] = {
    "0005": ids.after_migration,
}

#: Both matched whole (``fullmatch``: ``$`` would let a trailing newline through).
_NAME_RE = re.compile(r"(\d{4})_([a-z0-9_]+)\.cql")
_KEYSPACE_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,47}")

SCHEMA_MIGRATIONS = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version text PRIMARY KEY,
    name text,
    applied_at_ms bigint
)"""


@dataclass(frozen=True, slots=True)
class Migration:
    """One migration file: ``version`` orders it, ``statements`` are run in order."""

    version: str
    name: str
    statements: tuple[str, ...]

    @property
    def label(self) -> str:
        """``NNNN_name``, as printed and recorded."""
        return f"{self.version}_{self.name}"


@dataclass(frozen=True, slots=True)
class MigrationState:
    """A migration and when it was applied (``applied_at_ms`` None: pending)."""

    migration: Migration
    applied_at_ms: int | None

    @property
    def applied(self) -> bool:
        """Whether the migration has been applied."""
        return self.applied_at_ms is not None


def split_statements(text: str) -> list[str]:
    """The statements of a migration file: comments dropped, split at ``;`` line ends."""
    statements: list[str] = []
    current: list[str] = []
    for line in text.splitlines():
        if line.strip().startswith("--"):
            continue
        current.append(line)
        if line.rstrip().endswith(";"):
            statement = "\n".join(current).strip().rstrip(";").strip()
            if statement:
                statements.append(statement)
            current = []
    if "\n".join(current).strip():
        raise ValueError("migration ends with a statement that has no ';'")
    return statements


def load_migrations() -> list[Migration]:
    """Every migration shipped with the package, in version order."""
    folder = resources.files("relay.stores.cassandra").joinpath("migrations")
    found: list[Migration] = []
    for entry in folder.iterdir():
        match = _NAME_RE.fullmatch(entry.name)
        if match is None:
            continue
        statements = tuple(split_statements(entry.read_text(encoding="utf-8")))
        found.append(Migration(match.group(1), match.group(2), statements))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise ValueError(f"two migrations share a version: {versions}")
    return found


def _keyspace(config: CassandraConfig) -> str:
    if not _KEYSPACE_RE.fullmatch(config.keyspace):
        raise ConfigError(
            f"cassandra.keyspace: {config.keyspace!r} is invalid: use a letter, then up to "
            "47 letters, digits or '_'"
        )
    return config.keyspace


def _replication(config: CassandraConfig) -> str:
    rf = max(1, config.replication_factor)
    if config.local_dc:
        return f"{{'class': 'NetworkTopologyStrategy', '{config.local_dc}': {rf}}}"
    return f"{{'class': 'SimpleStrategy', 'replication_factor': {rf}}}"


async def _keyspace_exists(session: CassandraSession, keyspace: str) -> bool:
    rows = await session.execute(
        "SELECT keyspace_name FROM system_schema.keyspaces WHERE keyspace_name = ?",
        (keyspace,),
        op="migrate: look up the keyspace",
    )
    return bool(rows)


async def _applied(session: CassandraSession) -> dict[str, int]:
    await session.execute_ddl(SCHEMA_MIGRATIONS, op="migrate: create schema_migrations")
    rows = await session.execute(
        "SELECT version, applied_at_ms FROM {ks}.schema_migrations",
        op="migrate: read schema_migrations",
    )
    return {str(version): int(at or 0) for version, at in rows}


async def migrate(config: CassandraConfig, *, until: str | None = None) -> list[str]:
    """Create the keyspace if missing and apply pending migrations; return those applied.

    ``until`` (a version, e.g. ``"0004"``) stops after that one (tests of upgrades).
    """
    keyspace = _keyspace(config)
    async with CassandraSession(config, keyspace="") as admin:
        await admin.connect("migrate")
        await admin.execute_ddl(
            f"CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = {_replication(config)}",
            op=f"migrate: create keyspace {keyspace}",
        )
    done: list[str] = []
    async with CassandraSession(config, keyspace=keyspace) as session:
        await session.connect("migrate")
        applied = await _applied(session)
        for migration in load_migrations():
            if migration.version in applied:
                continue
            if until is not None and migration.version > until:
                break
            for i, statement in enumerate(migration.statements, 1):
                await session.execute_ddl(
                    statement, op=f"migration {migration.label} statement {i}"
                )
            after = _AFTER.get(migration.version)
            if after is not None:
                await after(session)
            await session.execute(
                "INSERT INTO {ks}.schema_migrations (version, name, applied_at_ms)"
                " VALUES (?, ?, ?)",
                (migration.version, migration.name, time.time_ns() // 1_000_000),
                op=f"migrate: record {migration.label}",
            )
            done.append(migration.label)
    return done


async def status(config: CassandraConfig) -> list[MigrationState]:
    """Every known migration, applied or pending (all pending if the keyspace is missing)."""
    keyspace = _keyspace(config)
    async with CassandraSession(config, keyspace="") as admin:
        await admin.connect("migrate")
        if not await _keyspace_exists(admin, keyspace):
            return [MigrationState(m, None) for m in load_migrations()]
        rows = await admin.execute(
            "SELECT table_name FROM system_schema.tables"
            " WHERE keyspace_name = ? AND table_name = 'schema_migrations'",
            (keyspace,),
            op="migrate: look up schema_migrations",
        )
        applied: dict[str, int] = {}
        if rows:
            found = await admin.execute(
                f"SELECT version, applied_at_ms FROM {keyspace}.schema_migrations",
                op="migrate: read schema_migrations",
            )
            applied = {str(version): int(at or 0) for version, at in found}
    return [MigrationState(m, applied.get(m.version)) for m in load_migrations()]


def format_status(states: list[MigrationState]) -> str:
    """One line per migration: ``applied 0001_queue (2024-...)`` or ``pending 0002_keys``."""
    lines = []
    for state in states:
        if state.applied_at_ms is None:
            lines.append(f"pending  {state.migration.label}")
        else:
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(state.applied_at_ms / 1000))
            lines.append(f"applied  {state.migration.label}  ({when})")
    return "\n".join(lines)
