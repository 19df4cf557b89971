"""Keeps web pages on other sites from driving the API through the user's browser.

Three ways a page the user visits could reach a service on 127.0.0.1, each closed here before any route runs:
  - a cross-site "simple" POST (a form, or fetch with a text/plain body) needs no CORS preflight: every POST
    must say `Content-Type: application/json`, which a browser sends cross-site only after a preflight (415);
  - DNS rebinding (the attacker's name re-resolved to 127.0.0.1, so the page counts as same-origin): the `Host`
    header must name the address the connection arrived at (any loopback name when that is loopback) or one
    of `allowed_hosts` (421);
  - CORS: `Access-Control-Allow-*` headers go only to origins listed in `cors_origins`; a preflight from any
    other origin gets none, so the browser never sends the real request.
Reference: https://fetch.spec.whatwg.org/#cors-safelisted-request-header (the "simple" content types).
"""
from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlsplit

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
ALLOW_METHODS = "GET, POST, OPTIONS"
ALLOW_HEADERS = "Authorization, Content-Type"


def split_list(value: str) -> tuple[str, ...]:
    """A comma list from a config value: 'a, b' -> ('a', 'b')."""
    return tuple(item.strip() for item in value.split(",") if item.strip())


@dataclass(frozen=True)
class BrowserPolicy:
    allowed_hosts: tuple[str, ...] = ()  # extra Host values: "name" (any port) or "name:port"; "*": any
    cors_origins: tuple[str, ...] = ()   # origins given CORS access, e.g. "https://chat.example.com"; "*": any

    def host_allowed(self, host: str, server: tuple[str, int] | None) -> bool:
        """Does the Host header `host` name this service? `server`: the (address, port) the request came in on."""
        if "*" in self.allowed_hosts:
            return True
        try:
            parts = urlsplit("//" + host)
            name, port = parts.hostname, parts.port
        except ValueError:  # a malformed port
            return False
        if not name or parts.username is not None or parts.password is not None or parts.path:
            return False
        for entry in self.allowed_hosts:
            want = urlsplit("//" + entry.lower())
            if want.hostname == name and (want.port is None or want.port == port):
                return True
        if server is None:
            return False
        address, server_port = server
        if (port or 80) != server_port:
            return False
        return name in (LOOPBACK_NAMES if _is_loopback(address) else (_unmap(address),))

    def origin_allowed(self, origin: str) -> bool:
        return "*" in self.cors_origins or origin.rstrip("/") in (o.rstrip("/") for o in self.cors_origins)


def _unmap(address: str) -> str:
    """'::ffff:10.0.0.5' (a dual-stack socket's view of an IPv4 client) -> '10.0.0.5'."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address.lower()
    return str(getattr(ip, "ipv4_mapped", None) or ip)


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(_unmap(address)).is_loopback
    except ValueError:
        return False


class BrowserGuard:
    """Pure ASGI middleware applying a BrowserPolicy. `policy()` is called per request: the policy belongs to the
    replica (its config), which exists only after this middleware is attached to the app at import time."""

    def __init__(self, app, policy: Callable[[], BrowserPolicy], error_body: Callable[[int, str, str], dict]):
        self.app, self.policy, self.error_body = app, policy, error_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        policy = self.policy()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        server = scope.get("server")
        if not policy.host_allowed(headers.get("host", ""), tuple(server) if server else None):
            return await self._refuse(send, 421, f"the Host header {headers.get('host', '')!r} does not name this "
                                                 f"server; add it to the allowed_hosts option if it should",
                                      "host_not_allowed")
        origin = headers.get("origin")
        allowed = origin is not None and policy.origin_allowed(origin)
        method = scope["method"]
        if method == "OPTIONS" and "access-control-request-method" in headers:  # a CORS preflight
            if not allowed:
                return await self._refuse(send, 403, f"the origin {origin!r} is not in cors_origins",
                                          "origin_not_allowed")
            return await _respond(send, 204, b"", _cors(origin) + [
                (b"access-control-allow-methods", ALLOW_METHODS.encode()),
                (b"access-control-allow-headers", ALLOW_HEADERS.encode()),
                (b"access-control-max-age", b"600")])
        if method == "POST":
            media_type = headers.get("content-type", "").split(";")[0].strip().lower()
            if media_type != "application/json":
                return await self._refuse(send, 415, f"POST bodies must be sent as Content-Type: application/json"
                                                     f", got {media_type or 'none'!r}", "unsupported_media_type")
        if not allowed:
            return await self.app(scope, receive, send)

        async def send_with_cors(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers", [])) + _cors(origin)}
            await send(message)

        await self.app(scope, receive, send_with_cors)

    async def _refuse(self, send, status: int, message: str, code: str):
        body = json.dumps(self.error_body(status, message, code)).encode()
        await _respond(send, status, body, [(b"content-type", b"application/json")])


def _cors(origin: str) -> list[tuple[bytes, bytes]]:
    # The origin itself, never "*": and Vary, so that a cache does not hand this answer to another origin.
    return [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]


async def _respond(send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]):
    await send({"type": "http.response.start", "status": status,
                "headers": headers + [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


# --------------------------------------------------------------------------- Ray Serve's own HTTP proxy
# The proxy answers `/-/routes` (which application holds which route prefix) and `/-/healthz` itself, before any
# application sees the request, so the replica's key check cannot cover them. Ray calls the function named by
# RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH in each proxy process and wraps its ASGI app in the middlewares it
# returns. The proxy is a worker of the cluster: it sees the environment the cluster was started with, which is
# why `arm_proxy` runs before Ray starts (serve/app.py's import, as `serve run` does it, and its main()).
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_KEY_ENV = "MINIMIND_PROXY_API_KEY_ENV"  # names the variable that holds the key, as api_key_env does
OPEN_PROXY_PATHS = ("/-/healthz",)  # a load balancer's liveness probe: says "success" and nothing more


def arm_proxy(api_key_env: str = "MINIMIND_API_KEY") -> None:
    """Have every Serve proxy the cluster starts from here on require the API key for its own endpoints."""
    import os
    os.environ.setdefault(PROXY_CALLBACK_ENV, "serve.guard.proxy_middlewares")
    os.environ[PROXY_KEY_ENV] = api_key_env


def proxy_middlewares() -> list:
    from starlette.middleware import Middleware
    return [Middleware(ProxyEndpointGuard)]


class ProxyEndpointGuard:
    """Pure ASGI middleware in the proxy: with a key set, `/-/` paths other than OPEN_PROXY_PATHS need it."""

    def __init__(self, app):
        import os
        self.app = app
        key = os.environ.get(os.environ.get(PROXY_KEY_ENV, "MINIMIND_API_KEY"), "")
        self.key = key.encode() or None

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if (self.key is None or scope["type"] != "http" or not path.startswith("/-/")
                or path.rstrip("/") in OPEN_PROXY_PATHS):
            return await self.app(scope, receive, send)
        import hmac
        auth = dict(scope.get("headers", [])).get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            return await self.app(scope, receive, send)
        body = json.dumps({"error": {"message": "missing or incorrect API key (send 'Authorization: Bearer <key>')",
                                     "type": "invalid_request_error", "param": None,
                                     "code": "invalid_api_key"}}).encode()
        await _respond(send, 401, body, [(b"content-type", b"application/json"),
                                         (b"www-authenticate", b"Bearer")])
