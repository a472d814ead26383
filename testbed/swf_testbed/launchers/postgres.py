"""A private PostgreSQL cluster (Debian's ``postgresql``) for the Prefect
server of the tests: a fresh data directory in a temporary directory, TCP on
127.0.0.1 and a private port, one database owned by one login with a password;
stopped and removed afterwards.

PostgreSQL refuses to run as root. When we are root, every PostgreSQL command
runs as the ``postgres`` system user (``runuser``), which owns the cluster's
directory; otherwise as ourselves.

Durability is traded for speed (``fsync``, ``synchronous_commit`` and
``full_page_writes`` off): the cluster lives as long as one test session.
"""

from __future__ import annotations

import logging
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from swf_panda_workers.service.processes import adopt_group, release_group

DEBIAN_BINARIES = Path("/usr/lib/postgresql")
log = logging.getLogger(__name__)

BINDIR_ENV = "SWF_POSTGRES_BINDIR"  # another installation's bin directory
SERVER_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    # Each Prefect server process pools up to 15 connections (5 + 10 overflow);
    # a session may run two servers, and its restarts overlap briefly.
    "max_connections": "200",
}


class PostgresError(RuntimeError):
    pass


def postgres_bindir() -> Path:
    """$SWF_POSTGRES_BINDIR, else the newest Debian installation's bin directory."""
    explicit = os.environ.get(BINDIR_ENV)
    if explicit:
        return Path(explicit)
    installed = sorted(
        (path.parent for path in DEBIAN_BINARIES.glob("*/bin/initdb")),
        key=lambda bindir: _major_version(bindir.parent.name),
    )
    if not installed:
        raise PostgresError(
            "PostgreSQL is not installed: run `apt-get install -y --no-install-recommends "
            f"postgresql` (or set {BINDIR_ENV} to a directory holding initdb and pg_ctl)"
        )
    return installed[-1]


def _major_version(name: str) -> int:
    return int(name) if name.isdigit() else -1


def port_taken(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0


@dataclass
class PostgresCluster:
    """``start()`` makes and starts the cluster, ``stop()`` stops and removes
    it; also a context manager. ``url`` is what Prefect's server takes as
    PREFECT_API_DATABASE_CONNECTION_URL."""

    port: int = 55432
    database: str = "prefect"
    user: str = "prefect"
    system_user: str = "postgres"  # who runs PostgreSQL when we are root
    password: str = field(default_factory=lambda: secrets.token_urlsafe(18), repr=False)
    root: Path | None = field(default=None, init=False)  # the cluster's temporary directory
    _bindir: Path | None = field(default=None, init=False)
    _started: bool = field(default=False, init=False)
    _postmaster: int | None = field(default=None, init=False)  # its pid and process group

    @property
    def url(self) -> str:
        return self.database_url()

    def database_url(self, database: str | None = None, scheme: str = "postgresql+asyncpg") -> str:
        """The URL of ``database`` (default the cluster's first) with the
        cluster's login: ``postgresql+asyncpg`` for Prefect's server, a bare
        ``postgresql`` for iDDS (which picks psycopg2 itself)."""
        return (
            f"{scheme}://{quote(self.user)}:{quote(self.password, safe='')}"
            f"@127.0.0.1:{self.port}/{quote(database or self.database)}"
        )

    def create_database(self, name: str) -> str:
        """Another database in the cluster, owned by the cluster's login (for
        another server: iDDS beside Prefect); returns its name."""
        if self.root is None:
            raise PostgresError("the cluster has not been started")
        self._run("createdb", "-h", str(self.root), "-p", str(self.port), "-U", self.user, name)
        return name

    @property
    def data_dir(self) -> Path:
        assert self.root is not None, "the cluster has not been started"
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        assert self.root is not None, "the cluster has not been started"
        return self.root / "postgres.log"

    def start(self) -> PostgresCluster:
        if port_taken(self.port):
            raise PostgresError(f"port {self.port} is taken: cannot start PostgreSQL there")
        self._bindir = postgres_bindir()
        self.root = Path(tempfile.mkdtemp(prefix="swf-postgres-"))
        try:
            self._initdb()
            self._run(
                "pg_ctl",
                "start",
                "--wait",
                "--timeout",
                "120",
                "-D",
                str(self.data_dir),
                "-l",
                str(self.log_path),
                "-o",
                self._server_options(),
            )
            self._started = True
            self._postmaster = self._adopt_postmaster()
            # Over the cluster's own socket directory, which only its owner
            # reaches: local logins are trusted, TCP ones need the password.
            self._run(
                "createdb",
                "-h",
                str(self.root),
                "-p",
                str(self.port),
                "-U",
                self.user,
                self.database,
            )
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the server (fast: open sessions are cut) and remove its files."""
        if self.root is None:
            return
        try:
            if self._started:
                self._run("pg_ctl", "stop", "--wait", "-m", "fast", "-D", str(self.data_dir))
                self._started = False
            if self._postmaster is not None:
                release_group(self._postmaster)
                self._postmaster = None
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def _adopt_postmaster(self) -> int | None:
        """pg_ctl detaches the server in a session of its own: have it killed
        if this process dies without stopping it (its backends follow)."""
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().split()[0])
            group = os.getpgid(pid)
        except (OSError, ValueError, IndexError) as exc:
            log.warning(
                "PostgreSQL's postmaster not found (%s): it would outlive a crash of this process",
                exc,
            )
            return None
        if group != pid:  # not a group of its own: killing the group could hit others
            log.warning(
                "PostgreSQL's postmaster %d leads no process group: it would outlive "
                "a crash of this process",
                pid,
            )
            return None
        adopt_group(group)
        return group

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    # --- running PostgreSQL's commands ---------------------------------------

    def _initdb(self) -> None:
        assert self.root is not None
        password_file = self.root / "password"
        password_file.write_text(self.password + "\n")
        password_file.chmod(0o600)
        self._give_to_system_user(self.root, password_file)
        try:
            self._run(
                "initdb",
                "-D",
                str(self.data_dir),
                "-U",
                self.user,
                f"--pwfile={password_file}",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
            )
        finally:
            password_file.unlink(missing_ok=True)

    def _server_options(self) -> str:
        assert self.root is not None
        settings = {
            **SERVER_SETTINGS,
            "port": str(self.port),
            "unix_socket_directories": str(self.root),
        }
        # pg_ctl hands -o to a shell: the temporary directory's name is plain.
        return " ".join(f"-c {name}={value}" for name, value in settings.items())

    def _as_root(self) -> bool:
        return os.geteuid() == 0

    def _give_to_system_user(self, *paths: Path) -> None:
        if not self._as_root():
            return
        try:
            account = pwd.getpwnam(self.system_user)
        except KeyError:
            raise PostgresError(
                f"no system user {self.system_user!r} to run PostgreSQL as (it refuses root); "
                "installing Debian's postgresql creates it"
            ) from None
        for path in paths:
            os.chown(path, account.pw_uid, account.pw_gid)

    def _run(self, program: str, *args: str) -> None:
        assert self._bindir is not None and self.root is not None
        argv = [str(self._bindir / program), *args]
        if self._as_root():
            argv = ["runuser", "-u", self.system_user, "--", *argv]
        done = subprocess.run(
            argv,
            cwd=self.root,
            capture_output=True,
            text=True,
            check=False,
            stdin=subprocess.DEVNULL,
            timeout=180,
        )
        if done.returncode != 0:
            raise PostgresError(
                f"{program} {' '.join(args[:2])} failed ({done.returncode}):\n"
                f"{done.stderr.strip() or done.stdout.strip()}\n{self.tail()}"
            )
