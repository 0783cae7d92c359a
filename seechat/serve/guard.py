"""Refusing cross-site requests before they reach the API (ASGI middleware).

A server on loopback with no key is still reachable from any web page its user opens: a page may POST a
`text/plain` body without a CORS preflight, and through DNS rebinding (a name of the attacker's that
resolves to 127.0.0.1) it may even read the answers. So, in this order:

- `Host` must name the address the server listens on, a localhost name, or one given with `--allow-host`
  (403 otherwise). A server listening on every address (0.0.0.0, ::) accepts any IP address as the host,
  since a rebinding attack needs a name. `--allow-host '*'` turns the check off.
- A request that carries `Origin` (browsers send it on cross-site requests) must come from one given with
  `--allow-origin` (403 otherwise; none is allowed by default). `--allow-origin '*'` allows every origin.
  Allowed origins get CORS answers from Starlette's CORSMiddleware, which the app adds.
- A POST body must be `application/json` (415 otherwise), which a browser sends cross-site only after a
  CORS preflight that the rule above refuses.
"""

from __future__ import annotations

import ipaddress

from fastapi.responses import JSONResponse

from . import protocol

LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "localhost.localdomain", "ip6-localhost"})
WILDCARD = frozenset({"0.0.0.0", "::", ""})


class CrossSiteGuard:
    """ASGI middleware applying the three rules of this module to every HTTP request."""

    def __init__(self, app, *, bound_host: str, allow_hosts: list[str] = (), allow_origins: list[str] = ()):
        self.app = app
        self.any_ip = bound_host.strip("[]").lower() in WILDCARD
        self.any_host = "*" in allow_hosts
        self.hosts = LOCAL_NAMES | {bound_host.strip("[]").lower()} | {h.strip("[]").lower() for h in allow_hosts}
        self.any_origin = "*" in allow_origins
        self.origins = {o.rstrip("/").lower() for o in allow_origins}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {}
        for key, value in scope["headers"]:
            headers.setdefault(key, value.decode("latin-1"))
        refusal = self._refusal(scope["method"], headers)
        if refusal is None:
            return await self.app(scope, receive, send)
        status, message, code = refusal
        await JSONResponse(protocol.error_body(message, code=code), status_code=status)(scope, receive, send)

    def _refusal(self, method: str, headers: dict[str, str]) -> tuple[int, str, str] | None:
        host = headers.get(b"host")
        if not self.any_host and (host is None or not self._host_ok(host)):
            return (403, f"the Host header {host!r} does not name this server; if it is reached under that name, "
                         "start it with --allow-host NAME", "host_not_allowed")
        origin = headers.get(b"origin")
        if origin is not None and not self.any_origin and origin.rstrip("/").lower() not in self.origins:
            return (403, f"requests from the web origin {origin!r} are not allowed; to let a web page at that origin "
                         "use this server, start it with --allow-origin ORIGIN", "origin_not_allowed")
        if method == "POST":
            media = headers.get(b"content-type", "").split(";", 1)[0].strip().lower()
            if media != "application/json":
                return (415, f"the request body must be JSON sent with 'Content-Type: application/json', "
                             f"not {media or 'no content type'!r}", "unsupported_media_type")
        return None

    def _host_ok(self, host: str) -> bool:
        name = host.strip().lower()
        if name.startswith("["):  # [v6]:port
            name = name[1:].partition("]")[0]
        elif name.count(":") == 1:
            name = name.partition(":")[0]
        if name.rstrip(".") in self.hosts:
            return True
        if self.any_ip:
            try:
                ipaddress.ip_address(name)
                return True
            except ValueError:
                return False
        return False
