"""Private servers the reliability scenarios may stop, restart and cut off.

Never the shared Postgres/Redis other tests use: a scenario that restarts its database must
not take down a neighbour's. Each server here runs on a free port in a temp folder:

- :class:`PrivatePostgres`: ``initdb`` + ``pg_ctl`` from /usr/lib/postgresql/*/bin, run as
  the ``postgres`` user (PostgreSQL refuses to run as root), trust auth, fsync off.
- :class:`PrivateRedis`: ``redis-server --save '' --appendonly no``: a restart loses every
  message, which is the point of the Redis scenario.
- :class:`SwitchableProxy`: a TCP proxy in front of the S3 server. ``down()`` stops listening
  and closes every open connection, so the store endpoint refuses connections exactly like a
  stopped server — while moto, behind it, keeps its objects (restarting moto would lose them:
  it keeps state in memory). The proxy keeps its port bound while down, so ``up()`` never
  races another process for it.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from tests.conftest import free_port, wait_port


def _as_postgres(args: list[str], **kw) -> subprocess.CompletedProcess:
    runner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    return subprocess.run(runner + args, check=True, capture_output=True, text=True, **kw)


class PrivatePostgres:
    def __init__(self):
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
        if not bins:
            raise RuntimeError("no PostgreSQL binaries under /usr/lib/postgresql/*/bin")
        self.bin = Path(bins[-1])
        self.dir = Path(tempfile.mkdtemp(prefix="cs-rel-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.port = free_port()
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        _as_postgres([str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust",
                      "-U", "postgres", "--no-sync"])
        self.start()

    @property
    def admin_url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def url(self, db: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        opts = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                f"-c full_page_writes=off -c max_connections=200")
        _as_postgres([str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", opts,
                      "-l", str(self.log), "-w", "-t", "60", "start"])
        wait_port(self.port, 30)

    def stop(self, mode: str = "fast") -> None:
        _as_postgres([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w",
                      "-t", "60", "stop"])

    def create_database(self, name: str) -> str:
        from sqlalchemy import create_engine, text

        engine = create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        with engine.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
        return self.url(name)

    def close(self) -> None:
        try:
            self.stop("immediate")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivateRedis:
    def __init__(self, log_dir: Path):
        self.port = free_port()
        self.log_dir = log_dir
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / "redis.log", "ab") as out:  # the child keeps its own copy
            self.proc = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--daemonize", "no"], stdout=out,
                stderr=subprocess.STDOUT)
        wait_port(self.port, 30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self, down_s: float = 1.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()


class SwitchableProxy:
    """Forward 127.0.0.1:<port> to ``target``; ``down()`` makes the port refuse connections.

    One listening socket for the proxy's whole life. Closing it and binding again in ``up()``
    lost the port under load to another process that took it meanwhile (``Address already in
    use``). Instead ``down()`` calls ``shutdown()`` on the listener: on Linux that leaves the
    listen state (new connections get a RST, i.e. "connection refused", and ``accept()``
    returns EINVAL) while the socket keeps its explicitly bound port, and ``listen()`` on the
    same socket starts accepting again.
    """

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._up = False
        self._generation = 0  # one accept thread per up(); older ones exit
        self._listener = self._bind()
        self.port = self._listener.getsockname()[1]
        self.up()

    @staticmethod
    def _bind() -> socket.socket:
        # An explicit port (not port 0): only an explicitly bound socket keeps its port through
        # shutdown(); a free port can still be taken between free_port() and bind(), so retry.
        for _ in range(20):
            sock = socket.socket()
            # the proxy's own closed connections linger in TIME_WAIT on this port; without
            # SO_REUSEADDR they block listen() in up(). Ports chosen by the kernel (bind to 0,
            # connect) still avoid a port bound like this.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", free_port()))
                return sock
            except OSError:
                sock.close()
        raise RuntimeError("no free port for the S3 proxy")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        with self._lock:
            if self._up:
                return
            self._listener.listen(64)
            self._up = True
            self._generation += 1
            generation = self._generation
        threading.Thread(target=self._accept, args=(generation,), daemon=True).start()

    def down(self) -> None:
        with self._lock:
            was_up, self._up = self._up, False
            conns, self._conns = self._conns, set()
        if was_up:
            self._listener.shutdown(socket.SHUT_RDWR)  # stop listening, keep the port
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    def close(self) -> None:
        self.down()
        self._listener.close()

    def _accept(self, generation: int) -> None:
        while generation == self._generation:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if not self._up:  # went down while this connection was being set up
                    client.close()
                    upstream.close()
                    continue
                self._conns.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)
