"""The SQL sinks of the quality log: one schema and one code path for SQLite and PostgreSQL.

SQLAlchemy Core carries both: the tables are defined once below, and every statement is built
from them, so a SQLite file and a PostgreSQL database hold the same rows. What differs is only
how writers share the log: SQLite serialises them with ``BEGIN IMMEDIATE`` (WAL mode,
``synchronous=FULL``); PostgreSQL runs their insert transactions side by side and serialises only
the creation of the schema, with a transaction-scoped advisory lock, so that many processes on
many hosts may open and write one log at once. The SQLite layout is the one earlier releases wrote with the ``sqlite3`` module
(``meta``, ``records`` and its indexes), so their files open unchanged.

Credentials stay out of everything this module says: the log's name is its URL without the
password, and every message from the database driver is scrubbed of the password (from the URL
or ``PGPASSWORD``) before it reaches an exception or a log line.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import sqlalchemy as sa
from sqlalchemy import event, exc
from sqlalchemy.engine import URL, Connection, make_url

#: The one schema. ``seq`` is the write order (SQLite's rowid alias; a sequence in PostgreSQL).
METADATA = sa.MetaData()
_SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
META = sa.Table(
    "meta", METADATA,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)
RECORDS = sa.Table(
    "records", METADATA,
    sa.Column("seq", _SEQ, primary_key=True, autoincrement=True),
    sa.Column("record_id", sa.Text, nullable=False, unique=True),
    sa.Column("run_id", sa.Text, nullable=False, index=True),
    sa.Column("arm", sa.Text, nullable=False, index=True),
    sa.Column("created_at", sa.Text, nullable=False, index=True),
    sa.Column("decision", sa.Text, nullable=False, index=True),
    sa.Column("schema_version", sa.Integer, nullable=False),
    sa.Column("data", sa.Text, nullable=False),
)
FEEDBACK = sa.Table(
    "feedback", METADATA,
    sa.Column("seq", _SEQ, primary_key=True, autoincrement=True),
    sa.Column("feedback_id", sa.Text, nullable=False, unique=True),
    sa.Column("record_id", sa.Text, sa.ForeignKey("records.record_id"), nullable=False, index=True),
    sa.Column("created_at", sa.Text, nullable=False),
    sa.Column("schema_version", sa.Integer, nullable=False),
    sa.Column("data", sa.Text, nullable=False),
)
# The index names earlier releases created (records_run_id, ...): same names, same files.
for _index in RECORDS.indexes | FEEDBACK.indexes:
    _index.name = f"{_index.table.name}_{next(iter(_index.columns)).name}"

#: meta keys holding the layout versions of the records table and the feedback table.
RECORDS_VERSION_KEY = "schema_version"
FEEDBACK_VERSION_KEY = "feedback_schema_version"
# Any constant: the advisory lock PostgreSQL openers take while they create the schema.
_SCHEMA_LOCK = 0x67726566
_BUSY_TIMEOUT_SECONDS = 30.0
_CONNECT_TIMEOUT_SECONDS = 10


def postgres_url(text: str) -> tuple[URL, str]:
    """``postgresql://user@host/db`` as SQLAlchemy's psycopg 3 URL, and the URL to show (no password).

    Unset parts (host, port, user, password, database) are left to libpq, which reads them from
    the ``PG*`` environment variables and ``~/.pgpass``.
    """
    try:
        url = make_url(text)
    except exc.ArgumentError:
        raise ValueError("quality log URL is not a valid postgresql:// URL") from None
    if url.get_backend_name() != "postgresql":
        raise ValueError(f"quality log URL must start with postgresql://, got {url.drivername}://")
    if url.get_driver_name() not in ("psycopg", "psycopg2", ""):
        raise ValueError(f"quality log URL driver must be psycopg (postgresql+psycopg://), got {url.drivername}")
    shown = url.render_as_string(hide_password=True)
    query = dict(url.query)
    query.setdefault("connect_timeout", str(_CONNECT_TIMEOUT_SECONDS))  # an unreachable host fails, not hangs
    return url.set(drivername="postgresql+psycopg", query=query), shown


class Redactor:
    """Replaces the log's password in any text; the password is read from the URL and PGPASSWORD."""

    def __init__(self, url: URL | None):
        secrets = {url.password if url is not None else None, os.environ.get("PGPASSWORD")}
        self._secrets = sorted((secret for secret in secrets if secret), key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


class SqlStore:
    """Records and feedback in SQL tables; each append is one transaction, committed before it returns.

    Args:
        location (`Path` or `str`): a SQLite file, or a ``postgresql://`` URL.
        records_version, feedback_version (`int`): the layouts this release writes, stored in
            ``meta`` by the first opener.
        check_version (`Callable`): ``(meta key, stored version)``, raising ValueError for a
            version this release cannot read (a newer one).

    Rows go in as column dicts and come out as ``(seq, JSON)``: the caller owns the classes, and
    checks each row's own schema version as it parses it.
    """

    def __init__(
        self,
        location: Path | str,
        *,
        records_version: int,
        feedback_version: int,
        check_version: Callable[[str, int], None],
    ):
        self._check_version = check_version
        self._versions = {RECORDS_VERSION_KEY: records_version, FEEDBACK_VERSION_KEY: feedback_version}
        if isinstance(location, Path):
            if not os.access(location.parent, os.W_OK | os.X_OK):
                # WAL mode creates path-wal and path-shm beside the database.
                raise PermissionError(13, "cannot open quality log: its directory is not writable", str(location))
            url, self.name = URL.create("sqlite", database=str(location)), str(location)
            self._redact = Redactor(None)
            self.engine = sa.create_engine(
                url, connect_args={"timeout": _BUSY_TIMEOUT_SECONDS, "check_same_thread": False}
            )
            event.listen(self.engine, "connect", _sqlite_connect)
            event.listen(self.engine, "begin", _sqlite_begin)
        else:
            url, self.name = postgres_url(location)
            self._redact = Redactor(url)
            # pre_ping: a connection the server dropped (restart, failover) is replaced, not reused.
            self.engine = sa.create_engine(url, pool_pre_ping=True)
            event.listen(self.engine, "connect", _postgres_connect)
        self.postgres = self.engine.dialect.name == "postgresql"
        self._closed = False
        self._has_feedback_table = True  # False for a log from before feedback existed (see below)
        try:
            with self._connection(write=True, verb="open") as connection:
                self._create_or_check_schema(connection)
        except BaseException:
            self.engine.dispose()
            raise

    # --- schema -----------------------------------------------------------------------------------

    def _create_or_check_schema(self, connection: Connection) -> None:
        if self.postgres:  # concurrent openers of a new log take turns (SQLite: BEGIN IMMEDIATE)
            connection.execute(sa.select(sa.func.pg_advisory_xact_lock(_SCHEMA_LOCK)))
        tables = set(sa.inspect(connection).get_table_names())
        if not tables:
            METADATA.create_all(connection)
            connection.execute(sa.insert(META), [
                {"key": key, "value": str(version)} for key, version in self._versions.items()
            ])
            return
        if not {META.name, RECORDS.name} <= tables:
            raise ValueError(
                f"{self.name} is a database but not a grefine-hooks quality log (tables {sorted(tables)}); "
                "give the quality log a database of its own"
            )
        stored = dict(connection.execute(sa.select(META.c.key, META.c.value)).all())
        if RECORDS_VERSION_KEY not in stored:
            raise ValueError(f"{self.name} is a database but not a grefine-hooks quality log (no schema version)")
        for key in (RECORDS_VERSION_KEY, FEEDBACK_VERSION_KEY):
            if key in stored:
                try:
                    self._check_version(key, int(stored[key]))
                except ValueError as error:
                    raise ValueError(f"quality log {self.name}: {error}") from None
        self._has_feedback_table = FEEDBACK.name in tables

    def _ensure_feedback_table(self, connection: Connection) -> None:
        """Logs from before feedback existed get the table on their first feedback, not on open."""
        if self._has_feedback_table:
            return
        if self.postgres:
            connection.execute(sa.select(sa.func.pg_advisory_xact_lock(_SCHEMA_LOCK)))
        if FEEDBACK.name not in sa.inspect(connection).get_table_names():
            FEEDBACK.create(connection)
            connection.execute(sa.insert(META), [
                {"key": FEEDBACK_VERSION_KEY, "value": str(self._versions[FEEDBACK_VERSION_KEY])}
            ])
        self._has_feedback_table = True

    # --- writing ----------------------------------------------------------------------------------

    def append(self, rows: Sequence[dict[str, Any]]) -> None:
        """Inserts record rows (columns of ``records`` but ``seq``) in one transaction.

        A row stored already, byte for byte, is skipped: a write whose commit landed although the
        caller saw an error (a connection lost at commit) is retried without failing forever. A
        different row under a stored ``record_id`` is refused, and then nothing is written.
        """
        _check_text(rows)
        try:
            with self._transaction() as connection:
                connection.execute(sa.insert(RECORDS), list(rows))
        except exc.IntegrityError:
            self._append_unstored(rows)

    def _append_unstored(self, rows: Sequence[dict[str, Any]]) -> None:
        """`append` once a record_id clashed: inserts the rows not stored yet, if the rest are identical."""
        ids = [row["record_id"] for row in rows]
        if len(set(ids)) != len(ids):
            raise ValueError(f"quality log {self.name}: one write holds a record_id twice")
        try:
            with self._transaction() as connection:
                query = sa.select(RECORDS.c.record_id, RECORDS.c.data).where(RECORDS.c.record_id.in_(ids))
                stored = dict(connection.execute(query).all())
                for row in rows:
                    if stored.get(row["record_id"], row["data"]) != row["data"]:
                        raise ValueError(
                            f"quality log {self.name}: record_id {row['record_id']!r} is already logged "
                            "with different content"
                        )
                unstored = [row for row in rows if row["record_id"] not in stored]
                if unstored:
                    connection.execute(sa.insert(RECORDS), unstored)
        except exc.IntegrityError:  # another writer stored one of these ids meanwhile
            raise ValueError(f"quality log {self.name}: a record_id is already logged") from None

    def append_feedback(self, row: dict[str, Any]) -> None:
        """Inserts one feedback row, in the transaction that checks its record exists."""
        _check_text([row])
        try:
            with self._transaction() as connection:
                self._ensure_feedback_table(connection)
                found = connection.execute(
                    sa.select(RECORDS.c.seq).where(RECORDS.c.record_id == row["record_id"])
                ).first()
                if found is None:
                    raise KeyError(row["record_id"])
                connection.execute(sa.insert(FEEDBACK), [row])
        except exc.IntegrityError:
            raise ValueError(f"quality log {self.name}: feedback_id {row['feedback_id']!r} is already logged") from None

    # --- reading ----------------------------------------------------------------------------------

    def load(
        self, run_id: str | None, arm: str | None, since: str | None, until: str | None
    ) -> list[tuple[int, str]]:
        """(seq, JSON) of the records matching the filters, in write order."""
        query = sa.select(RECORDS.c.seq, RECORDS.c.data).order_by(RECORDS.c.seq)
        if run_id is not None:
            query = query.where(RECORDS.c.run_id == run_id)
        if arm is not None:
            query = query.where(RECORDS.c.arm == arm)
        if since is not None:
            query = query.where(RECORDS.c.created_at >= since)
        if until is not None:
            query = query.where(RECORDS.c.created_at < until)
        with self._reading() as connection:
            return [tuple(row) for row in connection.execute(query)]

    def load_feedback(self, record_ids: Sequence[str] | None = None) -> list[tuple[int, str]]:
        """(seq, JSON) of the feedback (optionally on these records), in write order."""
        if not self._has_feedback_table:
            with self._reading() as connection:
                if FEEDBACK.name not in sa.inspect(connection).get_table_names():
                    return []
            self._has_feedback_table = True
        query = sa.select(FEEDBACK.c.seq, FEEDBACK.c.data).order_by(FEEDBACK.c.seq)
        if record_ids is not None:
            query = query.where(FEEDBACK.c.record_id.in_(list(record_ids)))
        with self._reading() as connection:
            return [tuple(row) for row in connection.execute(query)]

    def close(self) -> None:
        self._closed = True
        self.engine.dispose()

    # --- connections and errors -------------------------------------------------------------------

    @contextmanager
    def _connection(self, write: bool, verb: str | None = None) -> Iterator[Connection]:
        """A connection (inside a transaction when writing); database errors come out translated."""
        if self._closed:
            raise ValueError(f"quality log {self.name} is closed")
        try:
            with self.engine.connect() as connection:
                if not write:
                    yield connection
                    return
                connection.execution_options(grefine_write=True)
                with connection.begin():
                    yield connection
        except exc.IntegrityError:
            raise  # the caller says which constraint it was
        except exc.DBAPIError as error:
            raise self._translate(error, verb or ("write to" if write else "read")) from None

    def _transaction(self):
        return self._connection(write=True)

    def _reading(self):
        return self._connection(write=False)

    def _translate(self, error: exc.DBAPIError, verb: str) -> Exception:
        """A driver error as the OSError / ValueError the log promises: password scrubbed, no SQL text."""
        message = self._redact(" ".join(str(error.orig).split()))
        if isinstance(error, (exc.OperationalError, exc.InterfaceError)) or error.connection_invalidated:
            return OSError(f"cannot {verb} quality log {self.name}: {message}")
        if not self.postgres:
            return ValueError(f"quality log {self.name} is not a SQLite database or is corrupted: {message}")
        return ValueError(f"cannot {verb} quality log {self.name}: {message}")


def _sqlite_connect(dbapi_connection, connection_record) -> None:
    """WAL (readers never block the writer), FULL sync (on disk when write returns), foreign keys."""
    dbapi_connection.isolation_level = None  # SQLAlchemy's "begin" event below starts transactions
    cursor = dbapi_connection.cursor()
    try:
        mode = cursor.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise OSError(f"SQLite refused WAL mode (got {mode!r})")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


def _sqlite_begin(connection: Connection) -> None:
    """Writers take the write lock up front, so two never deadlock upgrading from a read lock."""
    immediate = connection.get_execution_options().get("grefine_write", False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _check_text(rows: Sequence[dict[str, Any]]) -> None:
    """PostgreSQL text cannot hold NUL; the JSON column escapes it, the key columns must not have it."""
    for row in rows:
        for name, value in row.items():
            if isinstance(value, str) and "\x00" in value:
                raise ValueError(f"{name} contains a NUL character, which a SQL quality log cannot store")


def _postgres_connect(dbapi_connection, connection_record) -> None:
    """A server (or role) with ``synchronous_commit=off`` would acknowledge commits before they are
    flushed; this session turns it back on, so a returned write is durable. Stronger settings stay."""
    with dbapi_connection.cursor() as cursor:
        cursor.execute("SHOW synchronous_commit")
        if cursor.fetchone()[0] == "off":
            cursor.execute("SET synchronous_commit TO on")
    dbapi_connection.commit()
