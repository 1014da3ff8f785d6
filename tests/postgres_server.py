"""A real PostgreSQL server for the tests: Debian's ``postgresql`` binaries, a temporary data directory.

PostgreSQL refuses to run as root, and CI runs as root: then the server runs as the ``postgres``
user the Debian package creates (or ``grefine-pg``, created here when neither exists) through
``runuser``. It listens on 127.0.0.1 at a free port and on a socket in its directory; the tests
connect over TCP with a password (SCRAM), the fixture administers over the socket.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

from serving import free_port

ADMIN = "grefine_admin"
APP_USER = "grefine"


def find_bin_dir() -> Path | None:
    """The newest ``/usr/lib/postgresql/N/bin`` with initdb, pg_ctl and postgres, else one on PATH."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda path: int(Path(path).parent.name))
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl:
        candidates.insert(0, str(Path(os.path.realpath(pg_ctl)).parent))
    for directory in reversed(candidates):
        if all((Path(directory) / name).is_file() for name in ("initdb", "pg_ctl", "postgres")):
            return Path(directory)
    return None


def _server_user() -> str | None:
    """None when not root (the server runs as us); else an unprivileged account to run it as."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "grefine-pg"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            pass
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "grefine-pg"],
        check=True, capture_output=True,
    )
    return "grefine-pg"


class PostgresServer:
    """initdb + pg_ctl in a temporary directory; ``stop()``/``start()`` simulate an outage."""

    def __init__(self, bin_dir: Path):
        self.bin_dir = bin_dir
        self.user = _server_user()
        self.root = Path(tempfile.mkdtemp(prefix="grefine-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.password = secrets.token_urlsafe(18)  # tests search every output for it
        if self.user is not None:
            shutil.chown(self.root, self.user)
        (self.root / "admin-password").write_text(secrets.token_urlsafe(18))
        if self.user is not None:
            shutil.chown(self.root / "admin-password", self.user)
        self._run(
            "initdb", "-D", str(self.data), "-U", ADMIN, "-E", "UTF8", "--no-sync", "--locale=C",
            "--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={self.root / 'admin-password'}",
        )
        self.start()
        with self.admin() as connection:
            connection.execute(f"CREATE ROLE {APP_USER} LOGIN CREATEDB PASSWORD '{self.password}'")

    def _run(self, program: str, *args: str) -> None:
        command = [str(self.bin_dir / program), *args]
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, cwd=self.root)
        if result.returncode:
            log = self.root / "server.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{program} failed ({result.returncode}): {result.stderr}{result.stdout}\n{tail}")

    def start(self) -> None:
        # fsync off: the tests kill clients and stop the server cleanly, never crash the machine, so
        # what the log promises (committed before write returns) is unchanged; CREATE DATABASE
        # per test is a flush less.
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.root} "
            "-c fsync=off -c full_page_writes=off"
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-o", options, "-w", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def admin(self):
        """An autocommit psycopg connection as the superuser, over the socket."""
        import psycopg

        return psycopg.connect(host=str(self.root), port=self.port, user=ADMIN, dbname="postgres", autocommit=True)

    def create_database(self) -> str:
        """A fresh database owned by the app user; its URL, password included."""
        name = f"quality_{secrets.token_hex(6)}"
        with self.admin() as connection:
            connection.execute(f"CREATE DATABASE {name} OWNER {APP_USER}")
        return self.url(name)

    def url(self, database: str, password: str | None = None) -> str:
        password = self.password if password is None else password
        return f"postgresql://{APP_USER}:{password}@127.0.0.1:{self.port}/{database}"

    def close(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        except RuntimeError:
            pass  # already stopped
        shutil.rmtree(self.root, ignore_errors=True)
