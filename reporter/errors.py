"""One exception tree: everything reporter raises on purpose derives from ReporterError."""

from __future__ import annotations

from dataclasses import dataclass

from billiard.exceptions import SoftTimeLimitExceeded

INTERRUPTS: tuple[type[BaseException], ...] = (SoftTimeLimitExceeded,)
"""Raised into running code to stop it (Celery's soft time limit): never report these as user errors."""


class ReporterError(Exception):
    """Root of every error reporter raises on purpose."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config file, located by file, line and dotted field path."""

    file: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class ConfigError(ReporterError):
    """The configuration is invalid; carries every problem found, not just the first."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class RenderError(ReporterError):
    """A report could not be rendered (template, data or PDF). Never retried."""


class DataError(RenderError):
    """The report's query or data function failed."""


class DeliveryError(ReporterError):
    """A message could not be handed to the mail server."""


class TransientDeliveryError(DeliveryError):
    """Worth retrying: SMTP 4xx, connection refused or dropped, timeouts."""


class PermanentDeliveryError(DeliveryError):
    """Not worth retrying: SMTP 5xx, a recipient refused for good."""


class BrokerUnavailable(ReporterError):
    """No broker is configured or reachable for an asynchronous command."""
