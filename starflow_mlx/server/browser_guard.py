"""What keeps web pages from using a server that listens on this machine, with or without a key.

A page on any site can make the visitor's browser send requests to ``127.0.0.1``. Two checks stop it:

- ``Host``: a page that rebinds its own name to 127.0.0.1 (DNS rebinding) reads the answers as same-origin, but its
  requests carry its name in ``Host``. Only IP addresses, ``localhost`` names and the names the server was told
  (``--host``, ``--allowed-host``) are served.
- ``Origin``: a browser names the page behind every cross-origin request (and every POST or DELETE); one that is not
  this server's own origin is refused, so a page cannot queue or delete jobs.

Bodies that a page may post cross-site without asking (``text/plain``, URL-encoded forms) are refused by the app
(415), so even a browser that sent no ``Origin`` could not queue a job.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

LOCAL_NAMES = ("localhost",)


def host_name(host: str) -> str:
    """The name or address of a ``Host`` header (or an origin's netloc), without its port, lower case."""
    host = host.strip().lower()
    if host.startswith("["):  # an IPv6 literal, [::1]:8000
        return host[1:host.find("]")] if "]" in host else host
    name, _, port = host.rpartition(":")
    return (name if name and port.isdigit() else host).rstrip(".")


def is_known_host(name: str, allowed: frozenset[str]) -> bool:
    try:
        ipaddress.ip_address(name)
        return True  # a page cannot rebind an address: its requests carry the page's own name
    except ValueError:
        pass
    return name in allowed or name in LOCAL_NAMES or name.endswith(".localhost")


class BrowserGuard:
    """ASGI middleware: 403 for a ``Host`` that is not this server's, or an ``Origin`` that is not its own."""

    def __init__(self, app, allowed_hosts=(), error=None):
        self.app = app
        self.allowed = frozenset(host_name(h) for h in allowed_hosts if h)
        self.error = error  # (status, message, code) -> an ASGI response in the app's error shape

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            refusal = self.refusal(dict(scope.get("headers") or []))
            if refusal is not None:
                await self.error(403, *refusal)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def refusal(self, headers: dict) -> tuple[str, str] | None:
        """(message, code) when the request is refused, else None."""
        host = headers.get(b"host", b"").decode("latin-1")
        name = host_name(host)
        if host and not is_known_host(name, self.allowed):
            return (f"this server does not answer to the host name {name[:64]!r}: start it with --allowed-host "
                    f"{name[:64]} to serve that name", "forbidden_host")
        origin = headers.get(b"origin")
        if origin is not None:
            netloc = urlsplit(origin.decode("latin-1")).netloc.lower()
            if not host or netloc != host.strip().lower():
                return (f"requests from web pages of another origin ({origin.decode('latin-1')[:64]}) are refused",
                        "forbidden_origin")
        return None
