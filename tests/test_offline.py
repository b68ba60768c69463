"""The session's network guard (conftest `no_network`): any connection or host lookup other
than loopback fails loudly and is recorded, here and in a Python subprocess; loopback works."""

import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.offline.network_guard import LOG, NetworkBlocked

REPO = Path(__file__).resolve().parents[1]
REMOTE = "http://192.0.2.1/weights.pth"  # TEST-NET-1: never a real host


def test_a_connection_elsewhere_fails_and_is_recorded(tmp_path, monkeypatch) -> None:
    log = tmp_path / "attempts.log"
    monkeypatch.setenv(LOG, str(log))  # this test's attempts are meant: not the session's
    with pytest.raises(NetworkBlocked):
        urllib.request.urlopen(REMOTE, timeout=1)
    with pytest.raises(NetworkBlocked), socket.socket() as sock:
        sock.connect(("192.0.2.1", 80))
    with pytest.raises(NetworkBlocked):
        socket.getaddrinfo("download.pytorch.org", 443)
    assert log.read_text().count("pid ") == 3


def test_a_subprocess_is_guarded_too(tmp_path, monkeypatch) -> None:
    log = tmp_path / "attempts.log"
    monkeypatch.setenv(LOG, str(log))
    code = f"import urllib.request; urllib.request.urlopen({REMOTE!r}, timeout=1)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode != 0 and "NetworkBlocked" in done.stderr
    assert "192.0.2.1" in log.read_text()


def test_loopback_connects() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        with socket.create_connection(server.getsockname(), timeout=5) as client:
            assert client.getpeername() == server.getsockname()
        with socket.create_connection(("localhost", server.getsockname()[1]), timeout=5):
            pass
