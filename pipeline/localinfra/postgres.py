"""A throwaway PostgreSQL cluster (initdb + pg_ctl) in a temp dir on a free port on 127.0.0.1.

Binaries come from $SENSORWATCH_PG_BIN, else the newest /usr/lib/postgresql/<major>/bin (Debian's
`postgresql` package), else `initdb` on PATH. initdb and postgres refuse to run as root, so as root
every server-side command runs as the `postgres` system user and the temp dir (under /tmp, which
that user can traverse) is chowned to it. The server listens on 127.0.0.1 only, where a random password is
needed (it is in `url`), plus a Unix socket inside the private temp dir (trust); never use this for real data.
"""

from __future__ import annotations

import atexit
import os
import pwd
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

from pipeline.localinfra._util import LocalInfraError, free_port, tail

ShutdownMode = Literal["smart", "fast", "immediate"]

#: Server settings for a disposable test cluster. fsync=off only risks data on an OS crash; a killed
#: or stopped server still keeps every committed transaction (synchronous_commit stays on).
DEFAULT_SETTINGS: Mapping[str, str] = {
    "fsync": "off",
    "shared_buffers": "32MB",
    "max_connections": "200",
    "log_min_messages": "warning",
}


def find_bin_dir() -> Path:
    """Directory holding initdb, pg_ctl and postgres (see module docstring for the search order)."""
    explicit = os.environ.get("SENSORWATCH_PG_BIN")
    if explicit:
        if not (Path(explicit) / "initdb").exists():
            raise LocalInfraError(f"SENSORWATCH_PG_BIN={explicit} has no initdb")
        return Path(explicit)

    def major(path: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path.parent.parent.name)) or (0,)

    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=major)
    if candidates:
        return candidates[-1].parent
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent
    raise LocalInfraError(
        "PostgreSQL server binaries (initdb, pg_ctl) not found; install them "
        "(Debian: apt-get install postgresql) or run `make system-deps`"
    )


class LocalPostgres:
    """One throwaway PostgreSQL cluster; use as a context manager or call start()/stop().

    Contract: after start() returns, `url` (postgresql+psycopg://USER:PASSWORD@127.0.0.1:PORT/DBNAME) reaches an
    empty database `dbname` owned by superuser `user`. TCP connections need `password` (random per cluster,
    scram-sha-256): with trust, any local user could connect as superuser and run programs as the server's user;
    the Unix socket lives in the cluster's private directory. stop_server()/start_server() stop
    and restart the same cluster on the same port with its data kept (for outage tests). stop() is
    idempotent: it stops the server and deletes the cluster unless keep_dir=True.
    """

    def __init__(
        self,
        *,
        dbname: str = "sensorwatch",
        user: str = "postgres",
        bin_dir: Path | None = None,
        settings: Mapping[str, str] | None = None,
        start_timeout: float = 60.0,
        keep_dir: bool = False,
    ) -> None:
        self.dbname = dbname
        self.user = user
        self._bin_dir = bin_dir
        self._settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self._start_timeout = start_timeout
        self._keep_dir = keep_dir
        self._dir: Path | None = None
        self._port: int | None = None
        self._run_as: pwd.struct_passwd | None = None
        self.startup_seconds: float | None = None
        self.password = secrets.token_urlsafe(18)  # URL-safe: goes into `url` as it is

    # -- public API ---------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        if self._port is None:
            raise LocalInfraError("LocalPostgres is not started")
        return self._port

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the database `dbname`; stays the same across stop_server()/start_server()."""
        return self.url_for(self.dbname)

    def url_for(self, dbname: str) -> str:
        """SQLAlchemy URL of another database on this server (e.g. "postgres")."""
        return f"postgresql+psycopg://{self.user}:{self.password}@127.0.0.1:{self.port}/{dbname}"

    @property
    def directory(self) -> Path | None:
        """The cluster's temp dir (data/, postgres.log, the Unix socket); None when not started."""
        return self._dir

    @property
    def log_path(self) -> Path | None:
        return self._dir / "postgres.log" if self._dir else None

    def is_running(self) -> bool:
        """True when pg_ctl reports the server running."""
        if self._dir is None:
            return False
        return self._pg_ctl(["status"], check=False).returncode == 0

    def start(self) -> Self:
        """initdb a new cluster, start it and create the database; raise LocalInfraError on failure."""
        if self._dir is not None:
            raise LocalInfraError("LocalPostgres already started")
        began = time.monotonic()
        bin_dir = self._bin_dir or find_bin_dir()
        self._bin_dir = bin_dir
        self._run_as = self._service_user()
        base = "/tmp" if self._run_as else None  # the service user must be able to reach the dir
        self._dir = Path(tempfile.mkdtemp(prefix="sensorwatch-pg-", dir=base))
        atexit.register(self.stop)
        try:
            if self._run_as:
                os.chown(self._dir, self._run_as.pw_uid, self._run_as.pw_gid)
            pwfile = self._dir / "pwfile"
            pwfile.write_text(self.password + "\n")
            pwfile.chmod(0o600)
            if self._run_as:
                os.chown(pwfile, self._run_as.pw_uid, self._run_as.pw_gid)
            self._run(
                [
                    str(bin_dir / "initdb"),
                    "-D",
                    str(self._data),
                    "-U",
                    self.user,
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    f"--pwfile={pwfile}",
                    "-E",
                    "UTF8",
                    "--no-locale",
                    "--no-sync",
                ],
                what="initdb",
            )
            pwfile.unlink()
            for attempt in range(3):  # a port picked as free can be taken before postgres binds it
                self._port = free_port()
                self._write_conf()
                try:
                    self.start_server()
                    break
                except LocalInfraError as exc:
                    if attempt == 2 or ("could not bind" not in str(exc) and "in use" not in str(exc)):
                        raise
            self._create_database(self.dbname)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def stop_server(self, mode: ShutdownMode = "fast") -> None:
        """Stop the server, keeping the cluster (`immediate` simulates a crash; recovery runs on start)."""
        if self._dir is None:
            raise LocalInfraError("LocalPostgres is not started")
        self._pg_ctl(["stop", "-m", mode, "-t", str(int(self._start_timeout))], what="pg_ctl stop")

    def start_server(self) -> None:
        """Start the server on the existing cluster and same port; return once it accepts connections."""
        if self._dir is None:
            raise LocalInfraError("LocalPostgres is not started")
        self._pg_ctl(
            ["start", "-l", str(self._dir / "postgres.log"), "-t", str(int(self._start_timeout))],
            what="pg_ctl start",
        )

    # Aliases that read well in outage tests.
    pause = stop_server
    resume = start_server

    def stop(self) -> None:
        """Stop the server (fast, falling back to immediate) and delete the cluster unless keep_dir."""
        atexit.unregister(self.stop)
        if self._dir is None:
            return
        if (self._data / "postmaster.pid").exists():
            for mode in ("fast", "immediate"):
                if self._pg_ctl(["stop", "-m", mode, "-t", "30"], check=False).returncode == 0:
                    break
        if not self._keep_dir:
            shutil.rmtree(self._dir, ignore_errors=True)
        self._dir = None
        self._port = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- internals ----------------------------------------------------------------------------------
    @property
    def _data(self) -> Path:
        assert self._dir is not None
        return self._dir / "data"

    @staticmethod
    def _service_user() -> pwd.struct_passwd | None:
        if os.geteuid() != 0:
            return None
        name = os.environ.get("SENSORWATCH_PG_OS_USER", "postgres")
        try:
            return pwd.getpwnam(name)
        except KeyError:
            raise LocalInfraError(
                f"running as root, and PostgreSQL refuses to run as root, but there is no `{name}` system "
                "user to run it as (Debian's postgresql package creates one; or set SENSORWATCH_PG_OS_USER)"
            ) from None

    def _write_conf(self) -> None:
        assert self._dir is not None
        settings = {
            **self._settings,
            "port": str(self._port),
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self._dir}'",
        }
        lines = [f"{key} = {self._quote(value)}" for key, value in settings.items()]
        conf = self._data / "postgresql.conf"
        text = conf.read_text().split("# --- sensorwatch localinfra ---")[0]
        conf.write_text(text + "# --- sensorwatch localinfra ---\n" + "\n".join(lines) + "\n")

    @staticmethod
    def _quote(value: str) -> str:
        if value.startswith("'") or re.fullmatch(r"[A-Za-z0-9_.\-]+", value):
            return value
        return "'" + value.replace("'", "''") + "'"

    def _pg_ctl(
        self, args: Sequence[str], *, what: str = "pg_ctl", check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        assert self._bin_dir is not None
        return self._run([str(self._bin_dir / "pg_ctl"), "-D", str(self._data), "-s", *args], what=what, check=check)

    def _run(self, cmd: Sequence[str], *, what: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        assert self._dir is not None
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG") and not k.startswith("LC_")}
        env["LC_ALL"] = "C"
        kwargs: dict[str, object] = {}
        if self._run_as:
            env.update(HOME=self._run_as.pw_dir, USER=self._run_as.pw_name, LOGNAME=self._run_as.pw_name)
            kwargs = {"user": self._run_as.pw_uid, "group": self._run_as.pw_gid, "extra_groups": []}
        # Output goes to a file, not a pipe: the server started by pg_ctl would inherit a pipe and keep
        # it open, and reading it would never end.
        out_path = self._dir / "command.out"
        with open(out_path, "w+") as out:
            if self._run_as:
                os.chown(out_path, self._run_as.pw_uid, self._run_as.pw_gid)
            proc = subprocess.run(
                list(cmd),
                cwd=self._dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                check=False,
                timeout=self._start_timeout + 30,
                **kwargs,  # type: ignore[call-overload]
            )
            out.seek(0)
            output = out.read()
        result = subprocess.CompletedProcess(proc.args, proc.returncode, output, "")
        if check and proc.returncode != 0:
            log = self._dir / "postgres.log"
            detail = f"\nlast lines of {log}:\n{tail(log)}" if log.exists() else ""
            raise LocalInfraError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{output.strip()}{detail}")
        return result

    def _create_database(self, dbname: str) -> None:
        import psycopg
        from psycopg import sql

        with psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user=self.user,
            password=self.password,
            dbname="postgres",
            autocommit=True,
            connect_timeout=10,
        ) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone()
            if not exists:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
