"""The server's settings, each default stated once: ``pipeline serve`` generates its options from these
fields (names, help, defaults) and :func:`pipeline.serve.app.create_app` takes its defaults from
:data:`SERVE_DEFAULTS`.

No heavy imports here (pydantic only), so the CLI can build ``serve``'s options without loading the app.
"""

from __future__ import annotations

import ipaddress

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["SERVE_DEFAULTS", "ServeSettings"]


class ServeSettings(BaseModel):
    """Where the server listens, the request limits it enforces and how it batches requests."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field("127.0.0.1", description="Address to bind; the default answers this machine only. "
                                               "Use 0.0.0.0 to be reachable from elsewhere (set an API key).")
    port: int = Field(8000, description="TCP port.")
    max_request_bytes: int = Field(20 * 1024 * 1024, ge=1, description="Largest request body (413 beyond).")
    max_pixels: int = Field(40_000_000, ge=1, description="Largest image in pixels (422 beyond).")
    max_batch_size: int = Field(8, ge=1, description="Most images per model call (dynamic batching).")
    max_wait_ms: float = Field(5.0, ge=0, description="How long a batch waits for more requests (only while "
                                                      "others are arriving).")
    max_queue: int = Field(256, ge=1, description="Requests waiting for the model before 503 busy.")

    @property
    def loopback(self) -> bool:
        """Whether ``host`` answers this machine only (a loopback address or ``localhost``)."""
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host == "localhost"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def app_limits(self) -> dict[str, object]:
        """The keyword arguments of ``create_app`` these settings give (all but host and port)."""
        return self.model_dump(exclude={"host", "port"})


SERVE_DEFAULTS = ServeSettings()
