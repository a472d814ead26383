"""The demo says when it would use a broker it did not start: whatever
answers STOMP on the configured port (another session's broker, say)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from swf_testbed.demo import borrowed_broker
from swf_testbed.launchers.stack import EmbeddedStack


@pytest.fixture
def stomp_answering() -> Iterator[int]:
    """A port where something answers STOMP CONNECT with CONNECTED."""
    server = socket.create_server(("127.0.0.1", 0))

    def answer() -> None:
        while True:
            try:
                connection, _ = server.accept()
            except OSError:
                return  # closed: the test is over
            with connection:
                connection.recv(1024)
                connection.sendall(b"CONNECTED\nversion:1.2\n\n\0")

    threading.Thread(target=answer, daemon=True).start()
    yield server.getsockname()[1]
    server.close()


def stack_on(port: int, tmp_path: Path) -> EmbeddedStack:
    return EmbeddedStack(tmp_path, {"brokers": {"host": "127.0.0.1", "port": port}})


def test_a_broker_already_answering_is_named(stomp_answering: int, tmp_path: Path) -> None:
    assert borrowed_broker(stack_on(stomp_answering, tmp_path)) == f"127.0.0.1:{stomp_answering}"


def test_no_broker_answering_is_none(tmp_path: Path) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    assert borrowed_broker(stack_on(port, tmp_path)) is None
