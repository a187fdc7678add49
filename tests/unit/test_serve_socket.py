"""`rankloop serve --workers N` answers without Nagle's delay: uvicorn binds that socket with protocol
number 0, so asyncio left TCP_NODELAY off and a cache hit waited for the client's delayed ACK (48 ms
p50 instead of 3.5 ms, measured with two workers)."""

from __future__ import annotations

import socket

import uvicorn
from typer.testing import CliRunner
from uvicorn.server import ServerState

from services.cli import app
from services.http import NoDelayProtocol


class _Transport:
    def __init__(self, sock: socket.socket):
        self.sock = sock

    def get_extra_info(self, name: str, default=None):
        return self.sock if name == "socket" else default

    def set_write_buffer_limits(self, **kwargs) -> None: ...


def test_the_protocol_turns_nagle_off_on_a_connection_accepted_from_a_protocol_0_socket():
    listener = socket.socket(family=socket.AF_INET)  # as uvicorn binds for --workers N
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    try:
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
        config = uvicorn.Config(app=lambda scope, receive, send: None)
        config.load()
        protocol = NoDelayProtocol(config=config, server_state=ServerState(), app_state={})
        protocol.connection_made(_Transport(accepted))  # type: ignore[arg-type]
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        for s in (client, accepted, listener):
            s.close()


def test_serve_with_workers_uses_that_protocol(monkeypatch, tmp_path):
    monkeypatch.setenv("RANKLOOP_STATE_DIR", str(tmp_path))
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: calls.append(k))
    result = CliRunner().invoke(app, ["serve", "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert calls and calls[0]["http"] is NoDelayProtocol and calls[0]["workers"] == 2
