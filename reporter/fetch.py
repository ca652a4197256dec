"""What a PDF may load: files under the templates folder, data: URLs, and http(s) from allowed hosts.

Templates come from several teams and report data can hold anything, so WeasyPrint never gets to
open a URL by itself. A host on the allowlist is still refused when it resolves to a private,
loopback, link-local or otherwise non-public address (cloud metadata services live there), on every
redirect hop and on the address actually connected to, so DNS tricks between check and connect do
not help. A refused resource is logged and left out; the PDF still renders.
"""

from __future__ import annotations

import functools
import http.client
import ipaddress
import logging
import socket
import ssl
from collections.abc import Iterable
from email.message import Message
from pathlib import Path
from typing import Any
from urllib import request
from urllib.parse import unquote, urlsplit

from weasyprint.urls import URLFetcher, URLFetcherResponse

from reporter import defaults
from reporter.settings import mask_url

log = logging.getLogger(__name__)

WEB_SCHEMES = ("http", "https")


class Refused(ValueError):
    """A resource the PDF may not load."""


def address_problem(ip: str) -> str | None:
    """Why a PDF may not connect to IP (loopback, private, …); None for a public address."""
    address = ipaddress.ip_address(ip.split("%", 1)[0])  # drop an IPv6 zone id ('fe80::1%eth0')
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 is loopback too
    for kind in ("loopback", "link_local", "private", "multicast", "reserved", "unspecified"):
        if getattr(address, f"is_{kind}"):
            return f"a {kind.replace('_', '-')} address"
    return None if address.is_global else "not a public address"


def host_allowed(host: str, allowed: Iterable[str]) -> bool:
    """Whether HOST is on the allowlist ('cdn.example.com', or '*.example.com' for its subdomains)."""
    try:
        host = host.lower().rstrip(".").encode("idna").decode("ascii")
    except UnicodeError:
        return False
    for pattern in allowed:
        if host == pattern or (pattern.startswith("*.") and host.endswith(pattern[1:])):
            return True
    return False


class ResourceFetcher(URLFetcher):  # type: ignore[misc]
    """WeasyPrint URL fetcher for reporter's PDFs: see the module docstring for what it allows."""

    def __init__(
        self, root: Path, allowed_hosts: Iterable[str] = (), timeout: float = 10, max_bytes: int = defaults.FETCH_MAX_BYTES
    ) -> None:
        super().__init__(timeout=timeout, allowed_protocols={"file", "data"}, allow_redirects=False, fail_on_errors=False)
        self.root = root.resolve()
        self.allowed_hosts = tuple(allowed_hosts)
        self.max_bytes = max_bytes
        self._web = request.OpenerDirector()
        # No ProxyHandler: a proxy would make the connection we check not the one that fetches.
        for handler in (
            _GuardedHTTPHandler(),
            _GuardedHTTPSHandler(),
            request.HTTPDefaultErrorHandler(),
            _CheckedRedirects(self),
            request.HTTPErrorProcessor(),
        ):
            self._web.add_handler(handler)

    def refusal(self, url: str) -> str | None:
        """Why URL may not be loaded, judged on the URL alone; None if it may."""
        scheme = url.split(":", 1)[0].lower()
        if scheme == "data":
            return None
        if scheme == "file":
            path = Path(unquote(urlsplit(url).path)).resolve()
            return None if path.is_relative_to(self.root) else "outside the templates folder"
        if scheme in WEB_SCHEMES:
            try:
                host = urlsplit(url).hostname or ""
            except ValueError:
                return "not a valid URL"
            if not host_allowed(host, self.allowed_hosts):
                return f"host {host!r} is not in defaults.pdf_allowed_hosts"
            return None
        return "only files under the templates folder, data: URLs and http(s) from defaults.pdf_allowed_hosts"

    def fetch(self, url: str, headers: Any = None) -> Any:
        try:
            why = self.refusal(url)
            if why is not None:
                raise Refused(f"refused: {why}")
            if url.split(":", 1)[0].lower() in WEB_SCHEMES:
                return self._fetch_web(url)
            return super().fetch(url, headers)
        except Refused as exc:
            log.warning("PDF: refused to load %s: %s", _shown(url), str(exc).removeprefix("refused: "))
            raise

    def _fetch_web(self, url: str) -> URLFetcherResponse:
        req = request.Request(url, headers={"User-Agent": "reporter (WeasyPrint)", "Accept": "*/*"})
        with self._web.open(req, timeout=self._timeout) as response:
            body = response.read(self.max_bytes + 1)
            if len(body) > self.max_bytes:
                raise Refused(f"refused: larger than {self.max_bytes:,} bytes")
            return URLFetcherResponse(response.url, body, _headers(response.headers), response.status)


def _headers(message: Message) -> dict[str, str]:
    return {key: str(value) for key, value in message.items()}


def _shown(url: str) -> str:
    """URL as logged: password masked, a long data: URL cut short."""
    url = mask_url(url)
    return url if len(url) <= 120 else url[:117] + "..."


def _guarded_connect(address: tuple[str, int], timeout: Any = None, source_address: Any = None, *args: Any, **kwargs: Any) -> socket.socket:
    """socket.create_connection that checks every address HOST resolves to before connecting to one."""
    host, port = address
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    for *_, sockaddr in infos:
        if (why := address_problem(str(sockaddr[0]))) is not None:
            raise Refused(f"refused: {host} resolves to {sockaddr[0]}, {why}")
    error: OSError | None = None
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            if isinstance(timeout, (int, float)):
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        return sock
    raise error or OSError(f"cannot connect to {host}:{port}")


class _GuardedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = _guarded_connect


class _GuardedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = _guarded_connect


class _GuardedHTTPHandler(request.HTTPHandler):
    def http_open(self, req: request.Request) -> http.client.HTTPResponse:
        return self.do_open(_GuardedHTTPConnection, req)


class _GuardedHTTPSHandler(request.HTTPSHandler):
    def https_open(self, req: request.Request) -> http.client.HTTPResponse:
        # The TLS context only when an https resource is fetched, and one per process: a fetcher is made
        # for every PDF, and a context costs 20-30 ms (the system CA store is read each time).
        return self.do_open(_GuardedHTTPSConnection, req, context=_tls_context())


@functools.cache
def _tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()


class _CheckedRedirects(request.HTTPRedirectHandler):
    """Follow a redirect only to http(s) on an allowed host (whose address is then checked too)."""

    def __init__(self, fetcher: ResourceFetcher) -> None:
        self.fetcher = fetcher

    def redirect_request(self, req: request.Request, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> request.Request | None:
        scheme = newurl.split(":", 1)[0].lower()
        why = self.fetcher.refusal(newurl) if scheme in WEB_SCHEMES else "a redirect may lead to http(s) only"
        if why is not None:
            raise Refused(f"refused: redirect to {_shown(newurl)}: {why}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)
