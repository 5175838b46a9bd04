"""A private, throw-away PostgreSQL server for the tests (no mock database).

``initdb`` into a temporary folder, listen on 127.0.0.1 only, on a free port, no Unix socket,
password authentication; stopped and deleted at the end. initdb refuses to run as root, so as
root the server runs as the unprivileged user ``nobody`` (with ``runuser``).
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path


class ServerUnavailable(RuntimeError):
    """No PostgreSQL server binaries on this machine."""


def find_bin_dir() -> Path:
    """The folder holding ``initdb`` and ``pg_ctl``: $PG_BIN, the PATH, or Debian's
    ``/usr/lib/postgresql/<version>/bin`` (newest version first)."""
    candidates = [os.environ.get("PG_BIN", "")]
    found = shutil.which("initdb")
    if found:
        candidates.append(str(Path(found).resolve().parent))
    versions = glob.glob("/usr/lib/postgresql/*/bin")
    candidates += sorted(versions, key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit()
                         else 0, reverse=True)
    for c in candidates:
        if c and (Path(c) / "initdb").is_file() and (Path(c) / "pg_ctl").is_file():
            return Path(c)
    raise ServerUnavailable("no PostgreSQL server binaries (initdb, pg_ctl) on PATH, in $PG_BIN or "
                            "under /usr/lib/postgresql/*/bin (Debian: apt-get install postgresql)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PostgresServer:
    bin_dir: Path
    base: Path
    port: int
    user: str
    password: str
    run_as: str | None  # the OS user the server runs as when we are root

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/postgres"

    @property
    def data(self) -> Path:
        return self.base / "data"

    def _run(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = [str(self.bin_dir / argv[0]), *argv[1:]]
        if self.run_as:
            cmd = ["runuser", "-u", self.run_as, "--", *cmd]
        out = subprocess.run(cmd, cwd=self.base, capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            log = self.base / "server.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{' '.join(argv[:2])} failed ({out.returncode}):\n{out.stdout}\n"
                               f"{out.stderr}\n{tail}")
        return out

    @classmethod
    def start(cls) -> PostgresServer:
        bin_dir = find_bin_dir()
        run_as = "nobody" if os.geteuid() == 0 else None
        # as root, a folder "nobody" can reach (TMPDIR may sit under /root)
        base = Path(tempfile.mkdtemp(prefix="hil-pg-", dir="/tmp" if run_as else None))
        server = cls(bin_dir, base, _free_port(), "hil", secrets.token_hex(12), run_as)
        try:
            pwfile = base / "pw"
            pwfile.write_text(server.password + "\n")
            pwfile.chmod(0o600)
            if run_as:
                ent = pwd.getpwnam(run_as)
                for p in (base, pwfile):
                    os.chown(p, ent.pw_uid, ent.pw_gid)
            server._run("initdb", "-D", str(server.data), "-U", server.user, f"--pwfile={pwfile}",
                        "--auth=scram-sha-256", "-E", "UTF8", "--no-sync")
            pwfile.unlink()
            with open(server.data / "postgresql.conf", "a") as fh:
                fh.write(f"\nlisten_addresses = '127.0.0.1'\nport = {server.port}\n"
                         "unix_socket_directories = ''\nfsync = off\nsynchronous_commit = off\n"
                         "full_page_writes = off\nmax_connections = 50\n")
            server._run("pg_ctl", "-D", str(server.data), "-l", str(base / "server.log"), "-w",
                        "-t", "60", "start")
        except BaseException:
            server.stop()
            raise
        return server

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            try:
                self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop", timeout=60)
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
        shutil.rmtree(self.base, ignore_errors=True)
