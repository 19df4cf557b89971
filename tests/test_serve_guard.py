"""serve/guard.py without Ray: which Host headers name the server for each way it can be bound, and the
Retry-After every 503 carries. tests/test_serve.py checks the same guard live, through Serve's proxy."""
import asyncio

import pytest

from serve.guard import BrowserPolicy
from serve.protocol import ApiError


@pytest.mark.parametrize("host,server,allowed", [
    # bound to loopback: any loopback name, with the port
    ("127.0.0.1:8000", ("127.0.0.1", 8000), True),
    ("localhost:8000", ("127.0.0.1", 8000), True),
    ("LocalHost:8000", ("127.0.0.1", 8000), True),
    ("[::1]:8000", ("::1", 8000), True),
    ("localhost:8001", ("127.0.0.1", 8000), False),
    ("localhost", ("127.0.0.1", 8000), False),         # no port is port 80
    ("localhost", ("127.0.0.1", 80), True),
    ("rebind.evil.example:8000", ("127.0.0.1", 8000), False),
    ("127.0.0.1.evil.example:8000", ("127.0.0.1", 8000), False),
    # bound to 0.0.0.0 or another address: the address the connection came in on
    ("10.1.2.3:8000", ("10.1.2.3", 8000), True),
    ("10.1.2.3:8000", ("::ffff:10.1.2.3", 8000), True),  # a dual-stack socket's view
    ("localhost:8000", ("10.1.2.3", 8000), False),
    ("10.1.2.4:8000", ("10.1.2.3", 8000), False),
    # malformed
    ("", ("127.0.0.1", 8000), False),
    ("127.0.0.1:80x", ("127.0.0.1", 8000), False),
    ("user@127.0.0.1:8000", ("127.0.0.1", 8000), False),
    ("127.0.0.1:8000/x", ("127.0.0.1", 8000), False),
    ("127.0.0.1:8000", None, False),  # no server address known: only allowed_hosts
])
def test_host_must_name_the_bound_address(host, server, allowed):
    assert BrowserPolicy().host_allowed(host, server) is allowed


def test_allowed_hosts_add_names():
    policy = BrowserPolicy(allowed_hosts=("chat.example.com", "box:9000"))
    assert policy.host_allowed("chat.example.com", ("127.0.0.1", 8000))
    assert policy.host_allowed("CHAT.example.com:443", None)
    assert policy.host_allowed("box:9000", None) and not policy.host_allowed("box:9001", None)
    assert not policy.host_allowed("evil.chat.example.com", ("127.0.0.1", 8000))
    assert BrowserPolicy(allowed_hosts=("*",)).host_allowed("anything:1", None)


def test_cors_origins_are_exact():
    policy = BrowserPolicy(cors_origins=("https://app.example.com",))
    assert policy.origin_allowed("https://app.example.com")
    assert not policy.origin_allowed("http://app.example.com") and not policy.origin_allowed("null")
    assert not BrowserPolicy().origin_allowed("http://127.0.0.1:8000")


def test_config_refuses_malformed_lists(tmp_path):
    from serve.app import ServeConfig

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text("{}")
    ServeConfig(model=str(tmp_path), cors_origins="https://a.example, http://b.example:8080", allowed_hosts="a, b:1")
    with pytest.raises(ValueError, match="cors_origins: 'a.example'"):
        ServeConfig(model=str(tmp_path), cors_origins="a.example")
    with pytest.raises(ValueError, match="allowed_hosts: 'http://a'"):
        ServeConfig(model=str(tmp_path), allowed_hosts="http://a")


def test_every_503_says_when_to_retry():
    from serve.app import _api_error

    busy = asyncio.run(_api_error(None, ApiError(503, "the queue is full")))
    assert busy.status_code == 503 and int(busy.headers["retry-after"]) >= 1
    later = asyncio.run(_api_error(None, ApiError(503, "engine down", retry_after=30)))
    assert later.headers["retry-after"] == "30"
    assert "retry-after" not in asyncio.run(_api_error(None, ApiError(400, "bad"))).headers
