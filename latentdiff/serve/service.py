"""What one server process (or one Ray Serve replica) holds: its settings, the loaded models, the limits, the
worker and the credentials.

    service = Service.start(ServeSettings(ckpts=["default"], max_batch=8))
    app = create_app(service)      # latentdiff.serve.app
"""

from __future__ import annotations

import base64
import hmac
from dataclasses import dataclass, field

from latentdiff.serve.models import ModelSet
from latentdiff.serve.schemas import Limits
from latentdiff.serve.worker import Worker

API_KEY_ENV = "LATENTDIFF_API_KEY"


@dataclass
class ServeSettings:
    """Everything a server is started with (plain values, so that Ray can send it to its replicas)."""

    ckpts: list[str] = field(default_factory=lambda: ["default"])
    device: str = "auto"
    precision: str = "auto"
    limits: Limits = field(default_factory=Limits)
    max_batch: int = 8  # images per generate call
    batch_window_ms: float = 50.0  # how long the oldest request waits for compatible ones
    batching: bool = True  # False: one request per generate call
    api_key: str | None = None  # Bearer token (or the password of HTTP basic auth, any user name)
    api_auth: str | None = None  # "user:pass" for HTTP basic auth (AUTOMATIC1111's --api-auth)

    def __post_init__(self):
        if self.api_auth is not None and ":" not in self.api_auth:
            raise ValueError("api_auth must be user:password")
        if self.max_batch < 1 or not self.batch_window_ms >= 0:
            raise ValueError(f"max_batch={self.max_batch} must be >= 1 and batch_window_ms="
                             f"{self.batch_window_ms} >= 0")


class Service:
    """Loaded models, limits, the worker and the credentials of one server."""

    def __init__(self, settings: ServeSettings, models: ModelSet):
        self.settings = settings
        self.models = models
        self.limits = settings.limits
        self.worker = Worker(settings.max_batch, settings.batch_window_ms / 1000, settings.batching,
                             settings.limits.max_queue)

    @classmethod
    def start(cls, settings: ServeSettings) -> Service:
        """Load the models (ValueError or OSError when one cannot be loaded) and start the worker."""
        from latentdiff.devices import resolve_device, resolve_precision

        device = resolve_device(settings.device)
        dtype = resolve_precision(settings.precision, device)
        return cls(settings, ModelSet.load(settings.ckpts, device, dtype))

    def stop(self) -> None:
        self.worker.stop()

    @property
    def auth_required(self) -> bool:
        return bool(self.settings.api_key or self.settings.api_auth)

    def authorized(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header carries the API key (``Bearer KEY``, or basic auth with KEY as the
        password) or the ``--api-auth`` user and password; compared with :func:`hmac.compare_digest`."""
        if not self.auth_required:
            return True
        scheme, _, value = (header or "").strip().partition(" ")
        key, auth = self.settings.api_key, self.settings.api_auth
        if scheme.lower() == "bearer":
            return bool(key) and hmac.compare_digest(value.strip().encode(), key.encode())
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        ok = False
        if key:
            ok |= hmac.compare_digest(password.encode(), key.encode())
        if auth:
            want_user, _, want_password = auth.partition(":")
            ok |= hmac.compare_digest(user.encode(), want_user.encode()) & hmac.compare_digest(
                password.encode(), want_password.encode())
        return ok
