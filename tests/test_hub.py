"""The hub as huggingface_hub reaches it: HF_HUB_OFFLINE decides without a request, the proxy
variables and HF_ENDPOINT carry the check (a local stand-in proxy, no real network), and a hub
that does not answer falls back to the local hub cache, or stops with one message."""
from __future__ import annotations

import socket
import threading

import pytest
from huggingface_hub import constants
from huggingface_hub import utils as hub_utils

from cnexp.base import BaseModelUnavailable, hub_reachable, in_hub_cache, use_local_cache

REPO = "owner/bundle"


class StandInProxy:
    """An HTTP proxy on 127.0.0.1 that records each request line and answers `reply`."""

    def __init__(self, reply: bytes):
        # it closes each connection after one answer, so it says so: a client must not reuse it
        if b"\r\n" in reply:
            reply = reply.replace(b"\r\n", b"\r\nConnection: close\r\n", 1)
        self.reply, self.requests = reply, []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:  # closed
                return
            with conn:
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    head += chunk
                self.requests.append(head.split(b"\r\n", 1)[0].decode())
                conn.sendall(self.reply)


@pytest.fixture
def proxy(monkeypatch):
    """Point the proxy variables at a stand-in; huggingface_hub's client reads them when it is
    built, so it is rebuilt before and after."""
    def start(reply: bytes) -> StandInProxy:
        stand_in = StandInProxy(reply)
        for var in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "http_proxy", "https_proxy"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("HTTPS_PROXY", stand_in.url)
        monkeypatch.setenv("HTTP_PROXY", stand_in.url)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        hub_utils.close_session()
        started.append(stand_in)
        return stand_in

    started: list[StandInProxy] = []
    yield start
    hub_utils.close_session()
    for stand_in in started:
        stand_in.server.close()


def test_hf_hub_offline_decides_without_a_request(monkeypatch):
    def no_request():
        raise AssertionError("HF_HUB_OFFLINE=1 must not make a request")

    monkeypatch.setattr(hub_utils, "get_session", no_request)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_reachable(REPO) == (False, "HF_HUB_OFFLINE is set")


def test_the_check_goes_through_https_proxy(proxy):
    # the proxy refuses the tunnel: the hub is unreachable, and the check asked the proxy (a
    # raw socket to huggingface.co would never have reached it)
    stand_in = proxy(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
    reachable, why = hub_reachable(REPO)
    assert stand_in.requests == [f"CONNECT {constants.ENDPOINT.split('://')[1]}:443 HTTP/1.1"]
    assert not reachable and f"via proxy 127.0.0.1:{stand_in.url.rsplit(':', 1)[1]}" in why


def test_a_hub_that_answers_through_the_proxy_at_hf_endpoint_is_reachable(proxy, monkeypatch):
    # HF_ENDPOINT (read by huggingface_hub into constants.ENDPOINT): a mirror whose name does not
    # even resolve here; only the proxy can reach it, and it answers
    monkeypatch.setattr(constants, "ENDPOINT", "http://hub-mirror.invalid")
    stand_in = proxy(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert hub_reachable(REPO) == (True, "")
    assert stand_in.requests == [f"HEAD http://hub-mirror.invalid/api/models/{REPO} HTTP/1.1"]
    assert use_local_cache(REPO) is False  # online: the load may download


def fake_hub_cache(root, repo: str) -> None:
    """The hub cache's layout for one snapshot of `repo` holding model_index.json."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    (repo_dir / "snapshots" / commit).mkdir(parents=True)
    (repo_dir / "snapshots" / commit / "model_index.json").write_text("{}")


def test_unreachable_hub_uses_the_local_cache_or_says_where_it_looked(proxy, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    proxy(b"")  # the proxy hangs up without an answer
    with pytest.raises(BaseModelUnavailable, match="unreachable") as err:
        use_local_cache(REPO)
    assert str(tmp_path) in str(err.value) and "via proxy 127.0.0.1" in str(err.value)
    fake_hub_cache(tmp_path, REPO)
    assert in_hub_cache(REPO)
    assert use_local_cache(REPO) is True  # load with local_files_only=True
