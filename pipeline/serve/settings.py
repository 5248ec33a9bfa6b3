"""The server's settings, each default stated once: ``pipeline serve`` generates its options from these
fields (names, help, defaults) and :func:`pipeline.serve.app.create_app` takes its defaults from
:data:`SERVE_DEFAULTS`. Also here, the start-up decisions ``pipeline serve`` makes from them: whether the
address answers this machine only (:func:`is_loopback`, :func:`open_access_warning`), which API key to
require (:func:`check_api_key`), which other sites' pages may call the API (:func:`check_origins`), which
host names the server answers to (:meth:`ServeSettings.allowed_hosts`, :class:`AllowedHosts`) and the
listening socket (:meth:`ServeSettings.listen_socket`).

No heavy imports here (pydantic, the standard library and the image limits' defaults, which the CLI loads
anyway with the stage configs), so the CLI can build ``serve``'s options without loading the app.
"""

from __future__ import annotations

import errno
import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Optional, Sequence
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field

from pipeline.data.images import DEFAULT_MAX_PIXELS
from pipeline.errors import ConfigError

__all__ = ["API_KEY_ENV", "SERVE_DEFAULTS", "AllowedHosts", "ServeSettings", "check_allowed_hosts", "check_api_key",
           "check_origins", "is_loopback", "open_access_warning", "parse_host"]

API_KEY_ENV = "PIPELINE_API_KEY"
_ORIGIN = re.compile(r"^https?://[^/?#\s]+$")
_LISTEN_HINTS = {
    errno.EADDRINUSE: "another process listens there: stop it or choose another --port",
    errno.EADDRNOTAVAIL: "this machine has no such address: check --host",
    errno.EACCES: "ports below 1024 need privileges: choose another --port",
}


def is_loopback(host: str) -> bool:
    """Whether ``host`` answers this machine only: a loopback address (127.0.0.0/8, ::1) or ``localhost``."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def open_access_warning(host: str, api_key: Optional[str]) -> Optional[str]:
    """What ``pipeline serve`` warns about when it would answer other machines without an API key; None
    when it would not (a loopback address, or a key)."""
    if api_key is not None or is_loopback(host):
        return None
    return (f"serving on {host} without an API key: anyone who can reach this address can use the model "
            f"(set --api-key or {API_KEY_ENV})")


def check_origins(origins: Sequence[str]) -> list[str]:
    """Web origins whose pages may call the API (``--cors-origin``), normalised (lower case, no trailing
    slash); a :class:`ConfigError` for one that is not ``scheme://host[:port]`` or ``*``."""
    out = []
    for given in origins:
        origin = given.strip().rstrip("/").lower()
        if origin != "*" and not _ORIGIN.match(origin):
            raise ConfigError(f"--cors-origin {given!r} is not a web origin: write scheme://host[:port] "
                              "(no path), or '*' for any")
        out.append(origin)
    return out


def parse_host(text: Optional[str]) -> Optional[tuple[str, Optional[int]]]:
    """``(name, port or None)`` of a ``Host`` header or an ``--allowed-host`` value (``NAME``, ``NAME:PORT``,
    ``[IPv6]``, ``[IPv6]:PORT``): the name in lower case, without brackets or a trailing dot. None for
    anything else (empty, a scheme, a path, user info, a bad port)."""
    if not text or any(c in text for c in "/?#@\\ \t"):
        return None
    try:
        parts = urlsplit("//" + text)
        port = parts.port
    except ValueError:  # a port that is no number or out of range, a malformed [IPv6]
        return None
    name = (parts.hostname or "").rstrip(".")
    return (name, port) if name else None


def _is_ip_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def _authority(name: str, port: Optional[int]) -> str:
    name = f"[{name}]" if ":" in name else name
    return name if port is None else f"{name}:{port}"


def check_allowed_hosts(names: Sequence[str]) -> list[str]:
    """Host names given with ``--allowed-host`` (``NAME``, ``NAME:PORT``, ``[IPv6]:PORT``, or ``*``: any),
    normalised; a :class:`ConfigError` for one that is not a host name."""
    out = []
    for given in names:
        text = given.strip()
        if text == "*":
            out.append(text)
            continue
        parsed = parse_host(text)
        if parsed is None:
            raise ConfigError(f"--allowed-host {given!r} is not a host name: write NAME or NAME:PORT (no scheme "
                              "or path; [ADDRESS] for IPv6), or '*' for any")
        out.append(_authority(*parsed))
    return out


@dataclass(frozen=True)
class AllowedHosts:
    """The host names a server answers to, judged from each request's ``Host`` header.

    A web page can rebind its own DNS name to this machine's address (DNS rebinding): the visitor's browser
    then sends that page's requests here under the page's own name, reads the answers as the page's, and the
    origin check (``Origin`` against ``Host``) sees nothing amiss. A request naming any other host is refused.
    ``names``: ``(name, port)`` pairs (port None: any port; a ``Host`` without a port means port 80);
    ``any_address_port``: a server bound to every address also answers to any IP address at that port (an
    address is no DNS name, so it cannot be rebound); ``any_host``: no check (``--allowed-host '*'``).
    """

    names: tuple[tuple[str, Optional[int]], ...]
    any_address_port: Optional[int] = None
    any_host: bool = False

    def allows(self, host: Optional[str]) -> bool:
        """Whether a request with this ``Host`` header (None: none) is for this server."""
        if self.any_host:
            return True
        parsed = parse_host(host)
        if parsed is None:
            return False
        name, port = parsed
        port = 80 if port is None else port
        if (name, port) in self.names or (name, None) in self.names:
            return True
        return port == self.any_address_port and _is_ip_address(name)

    def describe(self) -> str:
        """The names, for messages: ``127.0.0.1:8000, localhost:8000, [::1]:8000``."""
        if self.any_host:
            return "any host"
        listed = [_authority(name, port) for name, port in self.names]
        if self.any_address_port is not None:
            listed.append(f"any IP address at port {self.any_address_port}")
        return ", ".join(listed)


def check_api_key(key: Optional[str]) -> Optional[str]:
    """The API key to require (None: none). An empty or blank key is refused rather than read as "no key",
    and so is one with spaces around it (no HTTP header can carry them, so no request would match)."""
    if key is None:
        return None
    if not key.strip():
        raise ConfigError(f"the API key (--api-key or {API_KEY_ENV}) is empty: give a key, or unset "
                          f"{API_KEY_ENV} and leave out --api-key to serve without one")
    if key != key.strip():
        raise ConfigError(f"the API key (--api-key or {API_KEY_ENV}) starts or ends with whitespace, which no "
                          "request header can carry: remove it")
    return key


class ServeSettings(BaseModel):
    """Where the server listens, the request limits it enforces, how it batches requests and how many threads
    decode uploads and run the model."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field("127.0.0.1", description="Address to bind; the default answers this machine only. "
                                               "Use 0.0.0.0 to be reachable from elsewhere (set an API key).")
    port: int = Field(8000, ge=1, le=65535, description="TCP port (1-65535).")
    max_request_bytes: int = Field(20 * 1024 * 1024, ge=1, description="Largest request body (413 beyond).")
    body_timeout: float = Field(30.0, gt=0, description="Seconds a request has, from its headers, to send its "
                                                        "whole body (408 beyond).")
    max_uploads: int = Field(16, ge=1, description="Request bodies received at once; others wait their turn "
                                                   "within --body-timeout (503 beyond).")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="Largest image in pixels (422 beyond).")
    max_aspect_ratio: float = Field(100.0, ge=1, description="Largest ratio of an image's longer side to its "
                                                             "shorter one (422 beyond).")
    max_batch_size: int = Field(8, ge=1, description="Most images per model call (dynamic batching).")
    max_wait_ms: float = Field(5.0, ge=0, description="How long a batch waits for more requests (only while "
                                                      "others are arriving).")
    max_queue: int = Field(256, ge=1, description="Requests waiting for the model before 503 busy.")
    decode_threads: int = Field(4, ge=1, description="Threads reading, decoding and preparing uploads (never on "
                                                     "the event loop).")
    model_workers: int = Field(0, ge=0, description="Model calls that may run at once, each in its own thread; "
                                                    "beyond the first, only for full batches (0: the usable cores / "
                                                    "--threads, at least 1).")

    @property
    def loopback(self) -> bool:
        """Whether ``host`` answers this machine only (see :func:`is_loopback`)."""
        return is_loopback(self.host)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def app_limits(self) -> dict[str, object]:
        """The keyword arguments of ``create_app`` these settings give (all but host and port): the limits,
        batching and threads (``model_workers`` 0 is resolved by ``create_app`` as by ``pipeline serve``:
        :func:`pipeline.threads.model_workers`)."""
        return self.model_dump(exclude={"host", "port"})

    def allowed_hosts(self, extra: Sequence[str] = ()) -> AllowedHosts:
        """The host names this server answers to: on a loopback address its own names at its port
        (the address, ``127.0.0.1``, ``localhost``, ``[::1]``), on another address that address (or name)
        at its port, on every address (``0.0.0.0``, ``::``) the loopback names and any IP address at its
        port; plus ``extra`` (``--allowed-host``: ``NAME`` at any port, ``NAME:PORT``, ``*`` for any host).
        A :class:`ConfigError` for an ``extra`` that is not a host name."""
        extra = check_allowed_hosts(extra)
        own = (parse_host(self.host) or (self.host.lower(), None))[0]
        everywhere = _is_ip_address(own) and ipaddress.ip_address(own).is_unspecified
        names = ([] if everywhere else [own]) + (["127.0.0.1", "localhost", "::1"] if self.loopback or everywhere
                                                 else [])
        pairs = [(name, self.port) for name in names] + [parse_host(e) for e in extra if e != "*"]
        return AllowedHosts(tuple(dict.fromkeys(pairs)), any_address_port=self.port if everywhere else None,
                            any_host="*" in extra)

    def listen_socket(self) -> socket.socket:
        """A TCP socket bound to ``host:port`` and listening; a :class:`ConfigError` naming the address
        when that fails (the port in use, no such address here, a privileged port)."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # IPPROTO_TCP by name: asyncio turns Nagle off (TCP_NODELAY) only on connections of such a socket;
        # with Nagle on, each answer waits ~40 ms for a delayed ACK.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(2048)
            return sock
        except OSError as e:
            sock.close()
            what = e.strerror or str(e)
            hint = _LISTEN_HINTS.get(e.errno, "check --host and --port")
            raise ConfigError(f"cannot listen on {self.url}: {what}; {hint}") from None


SERVE_DEFAULTS = ServeSettings()
