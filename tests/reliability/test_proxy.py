"""The switchable proxy the storage scenarios use: while down it refuses connections and
still holds its port, so nothing else can take the port and ``up()`` cannot fail with
``Address already in use`` (seen once under load when ``up()`` re-bound the port)."""

from __future__ import annotations

import socket
import threading

import pytest

from tests.reliability.services import SwitchableProxy


@pytest.fixture
def echo_port():
    """A real TCP echo server on 127.0.0.1."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(1024):
                    conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()[1]
    stop.set()
    server.close()


def _echo(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        c.sendall(b"ping")
        return c.recv(1024)


def test_down_refuses_keeps_the_port_and_comes_back(echo_port):
    proxy = SwitchableProxy(echo_port)
    try:
        assert _echo(proxy.port) == b"ping"
        for _ in range(3):
            proxy.down()
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
            with socket.socket() as other, pytest.raises(OSError, match="in use"):
                other.bind(("127.0.0.1", proxy.port))  # nobody else can take the port
            proxy.up()
            assert _echo(proxy.port) == b"ping"
    finally:
        proxy.close()


def test_down_cuts_open_connections(echo_port):
    proxy = SwitchableProxy(echo_port)
    try:
        conn = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        conn.sendall(b"a")
        assert conn.recv(16) == b"a"
        proxy.down()
        try:
            conn.sendall(b"b")
            assert conn.recv(16) == b""  # closed by the proxy
        except OSError:
            pass  # or reset: either way the connection is gone
        proxy.up()  # connections it closed (FIN_WAIT2 / TIME_WAIT on the port) do not block it
        assert _echo(proxy.port) == b"ping"
        conn.close()
    finally:
        proxy.close()
