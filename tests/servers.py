"""Real servers for the tests: a throwaway PostgreSQL cluster and an `mlflow server` backed by it.

Many workers share one study only through a real database and a real tracking server, and SQLite
hides the bugs that matter (connection pools, concurrent writers, proxied artifacts). So the tests
start the real things: PostgreSQL from Debian's packages (`initdb` + `postgres`, no Docker) and
`python -m mlflow server` on its own database. `.ci/run` starts the cluster once and exports
AURORA_SWEEP_TEST_POSTGRES; without it the session starts its own. Missing binaries skip the tests
on a laptop and fail them in CI, never a silent skip there.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

POSTGRES_ENV = "AURORA_SWEEP_TEST_POSTGRES"
MISSING_POSTGRES = (
    "PostgreSQL binaries not found (no /usr/lib/postgresql/*/bin/initdb): run .ci/run, "
    f"or `apt-get install -y postgresql`, or set {POSTGRES_ENV} to a server's URL"
)
MLFLOW_START_TIMEOUT_S = 90.0


@dataclass(frozen=True)
class PostgresServer:
    """A PostgreSQL server the tests may create and drop databases on."""

    host: str
    port: int
    user: str = "postgres"
    password: str | None = None

    def url(self, dbname: str = "postgres") -> str:
        """SQLAlchemy URL (psycopg 3 driver) of one database, as Optuna and MLflow take it."""
        auth = self.user if self.password is None else f"{self.user}:{self.password}"
        return f"postgresql+psycopg://{auth}@{self.host}:{self.port}/{dbname}"

    def connect(self, dbname: str = "postgres"):
        """A psycopg connection in autocommit mode (CREATE/DROP DATABASE refuse transactions)."""
        import psycopg

        return psycopg.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            dbname=dbname,
            autocommit=True,
            connect_timeout=5,
        )

    def create_database(self, prefix: str = "test") -> str:
        """Create a database with a fresh unique name and return the name."""
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        with self.connect() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        """Drop a database, closing its connections; errors are ignored (it is cleanup)."""
        try:
            with self.connect() as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        except Exception:
            pass


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def postgres_bindir() -> Path | None:
    """Directory of `initdb`/`pg_ctl`: Debian's newest /usr/lib/postgresql/<ver>/bin, else PATH."""
    found = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if found:
        newest = max(found, key=lambda p: int(Path(p).parent.parent.name.split(".")[0]))
        return Path(newest).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def server_from_url(url: str) -> PostgresServer:
    """Parse a SQLAlchemy/libpq URL such as postgresql+psycopg://postgres@127.0.0.1:5432/postgres."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    return PostgresServer(
        host=parsed.host or "127.0.0.1",
        port=parsed.port or 5432,
        user=parsed.username or "postgres",
        password=parsed.password,
    )


class PostgresCluster:
    """A throwaway cluster in a fresh directory: `initdb`, then `postgres` as our own child.

    The postmaster runs as a child of this process rather than through `pg_ctl start`, which
    leaves it orphaned: this way the fixture stops it (SIGINT is PostgreSQL's fast shutdown) and
    reaps it, and no zombie is left where PID 1 does not reap.
    """

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        # Not under pytest's tmp dir: that one is mode 0700 for root, and the cluster runs as
        # `postgres` (initdb refuses root). The socket path must also stay short (about 100 bytes).
        self.directory = Path(tempfile.mkdtemp(prefix="aurora-pg-"))
        self.data = self.directory / "data"
        self.log = self.directory / "log"
        self.port = free_port()
        # As root, drop to `postgres` (what `runuser -u postgres` does in .ci/run).
        as_root = os.geteuid() == 0
        self._user = (
            {"user": "postgres", "group": "postgres", "extra_groups": []} if as_root else {}
        )
        self._process: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> PostgresServer:
        if self._user:
            shutil.chown(self.directory, user="postgres", group="postgres")
        initdb = subprocess.run(
            [str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres"]
            + ["--no-sync"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            cwd=self.directory,
            **self._user,
        )
        if initdb.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{initdb.stdout}\n{initdb.stderr}")
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.directory),
            "max_connections": "200",
            # A throwaway cluster: durability only costs time.
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
        }
        command = [str(self.bindir / "postgres"), "-D", str(self.data)]
        for key, value in settings.items():
            command += ["-c", f"{key}={value}"]
        with self.log.open("wb") as sink:
            self._process = subprocess.Popen(
                command,
                stdout=sink,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.directory,
                start_new_session=True,
                **self._user,
            )
        server = PostgresServer(host="127.0.0.1", port=self.port)
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"postgres exited with {self._process.returncode}:\n{_log_tail(self.log)}"
                )
            try:
                with server.connect():
                    return server
            except Exception:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"postgres did not accept connections within {timeout:.0f} s:\n"
                        f"{_log_tail(self.log)}"
                    ) from None
                time.sleep(0.1)

    def stop(self) -> None:
        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGINT)  # fast shutdown: disconnect clients, then exit
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


def _check_answers(server: PostgresServer, where: str) -> None:
    try:
        with server.connect() as conn:
            conn.execute("SELECT 1")
    except Exception as error:
        pytest.fail(f"PostgreSQL at {where} does not answer: {error}", pytrace=False)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL server: $AURORA_SWEEP_TEST_POSTGRES if set, else a throwaway cluster."""
    url = os.environ.get(POSTGRES_ENV)
    if url:
        server = server_from_url(url)
        _check_answers(server, f"{POSTGRES_ENV}={url}")
        yield server
        return
    bindir = postgres_bindir()
    if bindir is None:
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(MISSING_POSTGRES, pytrace=False)
        pytest.skip(MISSING_POSTGRES)
    cluster = PostgresCluster(bindir)
    try:
        try:
            server = cluster.start()
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as error:
            pytest.fail(f"could not start a PostgreSQL cluster: {error}", pytrace=False)
        _check_answers(server, f"127.0.0.1:{server.port}")
        yield server
    finally:
        cluster.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh, empty database on the session's server, dropped afterwards; its SQLAlchemy URL."""
    name = postgres_server.create_database("test")
    try:
        yield postgres_server.url(name)
    finally:
        postgres_server.drop_database(name)


def _stop_process_group(process: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM the server's whole process group (uvicorn workers included), then SIGKILL."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            return
    # Workers can outlive their parent; whatever is left of the group goes now.
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def _wait_healthy(process: subprocess.Popen, url: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            pytest.fail(
                f"mlflow server exited with {process.returncode} before answering "
                f"{url}/health; log tail:\n{_log_tail(log)}",
                pytrace=False,
            )
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            pytest.fail(
                f"mlflow server did not answer {url}/health within {timeout:.0f} s; "
                f"log tail:\n{_log_tail(log)}",
                pytrace=False,
            )
        time.sleep(0.2)


@pytest.fixture(scope="session")
def mlflow_server(postgres_server: PostgresServer, tmp_path_factory) -> Iterator[str]:
    """A real `mlflow server` on its own PostgreSQL database with proxied artifacts; its HTTP URL."""
    root = tmp_path_factory.mktemp("mlflow-server")
    artifacts = root / "artifacts"
    artifacts.mkdir()
    log = root / "server.log"
    database = postgres_server.create_database("mlflow")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        # No phoning home (there is no network here), and no job-runner subprocesses: the
        # sweep never submits server-side jobs.
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    command = [
        sys.executable,
        *("-m", "mlflow", "server"),
        *("--backend-store-uri", postgres_server.url(database)),
        *("--artifacts-destination", str(artifacts)),
        "--serve-artifacts",
        *("--host", "127.0.0.1", "--port", str(port)),
        *("--workers", "1"),
    ]
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command,
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=root,
            start_new_session=True,
        )
    try:
        _wait_healthy(process, url, log, MLFLOW_START_TIMEOUT_S)
        yield url
    finally:
        _stop_process_group(process)
        postgres_server.drop_database(database)
