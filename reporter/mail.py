"""Emails: build the MIME message and hand it to SMTP or to a local Maildir.

Errors are sorted for the retry policy: TransientDeliveryError (4xx, connection trouble) is retried,
PermanentDeliveryError (5xx) is not. Every recipient refused is reported on its own. No header can
carry a line break or control character, and no error names the SMTP password.
"""

from __future__ import annotations

import hashlib
import mailbox
import smtplib
import ssl
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from email.utils import format_datetime, getaddresses, parseaddr
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qs, unquote, urlsplit

from reporter import defaults
from reporter.config import normalize_address
from reporter.errors import ConfigError, PermanentDeliveryError, Problem, TransientDeliveryError
from reporter.render import Rendered, one_line
from reporter.schedule import isoformat
from reporter.settings import mask_url, scrub


def message_id(report: str, slot: datetime, recipient: str, sender: str) -> str:
    """Deterministic Message-ID of (report, slot, recipient): a resend carries the same id."""
    digest = hashlib.sha256(f"{report}\x00{isoformat(slot)}\x00{recipient.lower()}".encode()).hexdigest()[:24]
    address = parseaddr(sender)[1]
    domain = address.rpartition("@")[2] if "@" in address else ""
    utc = slot.astimezone(UTC)
    return f"<{report}.{utc.strftime('%Y%m%dT%H%M%SZ')}.{digest}@{domain or 'reporter.invalid'}>"


def build(rendered: Rendered, sender: str, to: list[str], cc: list[str], msg_id: str, with_html: bool) -> EmailMessage:
    """multipart/mixed( multipart/alternative(text, html), attachments… ).

    Every address is validated again here (ValueError if one is not an address), so nothing but an
    address reaches From, To or Cc whoever calls this.
    """
    msg = EmailMessage(policy=SMTP_POLICY)
    msg["Subject"] = one_line(rendered.subject)  # no CR, LF or control character reaches the header
    msg["From"] = normalize_address(sender)
    msg["To"] = ", ".join(normalize_address(a) for a in to)
    if cc:
        msg["Cc"] = ", ".join(normalize_address(a) for a in cc)
    msg["Date"] = format_datetime(datetime.now().astimezone())
    msg["Message-ID"] = msg_id
    msg["X-Reporter-Report"] = rendered.report
    msg["X-Reporter-Slot"] = isoformat(rendered.slot)
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(rendered.text)
    if with_html:
        msg.add_alternative(rendered.html, subtype="html")
    for filename, mime, content in rendered.attachments():
        maintype, subtype = mime.split("/")
        msg.add_attachment(content, maintype=maintype, subtype=subtype, filename=filename)
    return msg


def addresses(header_values: list[str]) -> list[str]:
    """The bare addresses of 'Name <a@b>' values, for the SMTP envelope."""
    return [addr for _, addr in getaddresses(header_values) if addr]


@dataclass
class Outcome:
    """What the server did with one message: the refused recipients and why (code, reason)."""

    refused: dict[str, tuple[int, str]] = field(default_factory=dict)


class Transport(Protocol):
    """Somewhere to hand a message; open once per task, used for every recipient."""

    def connect(self) -> None:
        """Open the connection now, so its set-up does not fall between a rate-limit slot and the send."""
        ...

    def send(self, msg: EmailMessage, sender: str, recipients: list[str]) -> Outcome: ...

    def close(self) -> None: ...

    def describe(self) -> str: ...


class MaildirTransport:
    """Writes each message as a file in a Maildir (the embedded default: no mail server needed)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)  # Maildir creates only the last folder
        self._box = mailbox.Maildir(str(path), create=True)

    def connect(self) -> None:
        pass

    def send(self, msg: EmailMessage, sender: str, recipients: list[str]) -> Outcome:
        del msg["X-Reporter-Envelope-To"]
        msg["X-Reporter-Envelope-To"] = ", ".join(recipients)
        self._box.add(msg.as_bytes())
        return Outcome()

    def close(self) -> None:
        self._box.close()

    def describe(self) -> str:
        return f"Maildir {self.path.resolve()}/new"


@dataclass(frozen=True)
class SmtpSettings:
    host: str
    port: int
    ssl: bool
    starttls: bool
    user: str | None
    password: str | None = field(repr=False)
    timeout: float

    @classmethod
    def from_url(cls, url: str) -> SmtpSettings:
        """smtp://[user:pass@]host[:port][?starttls=true&timeout=30] or smtps://…"""

        def problem(msg: str) -> ConfigError:
            return ConfigError([Problem("REPORTER_SMTP_URL", None, "", f"{msg} (got {mask_url(url)})")])

        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            # urllib's message quotes the text it choked on, which may be part of the password.
            raise problem("not a valid URL: check the port, and percent-encode '/', '@' or ':' in the password (%2F, %40, %3A)") from None
        if parts.scheme not in ("smtp", "smtps"):
            raise problem("must start with smtp:// or smtps://")
        if not parts.hostname:
            raise problem("names no host")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        starttls = query.get("starttls", "false").lower() in ("1", "true", "yes")
        try:
            timeout = float(query.get("timeout", defaults.SMTP_TIMEOUT))
        except ValueError:
            raise problem(f"timeout={query['timeout']!r} is not a number of seconds") from None
        if not 0 < timeout <= 3600:
            raise problem("timeout must be between 0 and 3600 seconds")
        return cls(
            host=parts.hostname,
            port=port or (465 if parts.scheme == "smtps" else 25),
            ssl=parts.scheme == "smtps",
            starttls=starttls,
            user=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            timeout=timeout,
        )


class SmtpTransport:
    """SMTP, SMTPS or STARTTLS; one connection reused for a task's messages, reopened if dropped."""

    def __init__(self, settings: SmtpSettings) -> None:
        self.settings = settings
        self._conn: smtplib.SMTP | None = None

    def _connect(self) -> smtplib.SMTP:
        s = self.settings
        context = ssl.create_default_context()
        conn: smtplib.SMTP
        if s.ssl:
            conn = smtplib.SMTP_SSL(s.host, s.port, timeout=s.timeout, context=context)
        else:
            conn = smtplib.SMTP(s.host, s.port, timeout=s.timeout)
        try:
            conn.ehlo()
            if s.starttls:
                conn.starttls(context=context)
                conn.ehlo()
            if s.user:
                conn.login(s.user, s.password or "")
        except smtplib.SMTPAuthenticationError as exc:
            conn.close()
            # The server's words only: never the password.
            raise PermanentDeliveryError(
                self._scrub(f"SMTP login as {s.user!r} refused by {s.host}:{s.port}: {exc.smtp_code} {_text(exc.smtp_error)}")
            ) from None
        except BaseException:
            conn.close()
            raise
        return conn

    def connect(self) -> None:
        if self._conn is None:
            try:
                self._conn = self._connect()
            except (smtplib.SMTPException, OSError):
                pass  # send() tries again and sorts the failure into transient or permanent

    def send(self, msg: EmailMessage, sender: str, recipients: list[str]) -> Outcome:
        try:
            if self._conn is None:
                self._conn = self._connect()
            refused = self._conn.send_message(msg, from_addr=sender, to_addrs=recipients)
            return Outcome({r: (code, _text(reason)) for r, (code, reason) in refused.items()})
        except smtplib.SMTPRecipientsRefused as exc:
            return Outcome({r: (code, _text(reason)) for r, (code, reason) in exc.recipients.items()})
        except smtplib.SMTPNotSupportedError as exc:
            # An address with a non-ASCII local part needs SMTPUTF8; trying again will not add it.
            raise PermanentDeliveryError(f"SMTP {self.settings.host}:{self.settings.port}: {exc}") from None
        except smtplib.SMTPResponseException as exc:
            self._drop()
            text = self._scrub(f"SMTP {exc.smtp_code} {_text(exc.smtp_error)} from {self.settings.host}:{self.settings.port}")
            if 400 <= exc.smtp_code < 500 or exc.smtp_code == -1:
                raise TransientDeliveryError(text) from None
            raise PermanentDeliveryError(text) from None
        except (smtplib.SMTPServerDisconnected, smtplib.SMTPConnectError, ConnectionError, TimeoutError, OSError) as exc:
            self._drop()
            raise TransientDeliveryError(
                self._scrub(f"SMTP {self.settings.host}:{self.settings.port} unreachable: {type(exc).__name__}: {exc}")
            ) from None
        except smtplib.SMTPException as exc:
            self._drop()
            raise TransientDeliveryError(self._scrub(f"SMTP error from {self.settings.host}:{self.settings.port}: {exc}")) from None

    def _scrub(self, text: str) -> str:
        """TEXT without the password, should a server or library ever quote it back."""
        return scrub(text, self.settings.password)

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.quit()
            except (smtplib.SMTPException, OSError):
                pass
            self._drop()

    def describe(self) -> str:
        s = self.settings
        return f"SMTP {'smtps' if s.ssl else 'smtp'}://{s.host}:{s.port}" + (" (STARTTLS)" if s.starttls else "")


def destination(smtp_url: str | None, outbox: Path) -> str:
    """Where mail goes, in words; a malformed SMTP URL raises ConfigError here, before any send."""
    mailer = transport(smtp_url, outbox)
    try:
        return mailer.describe()
    finally:
        mailer.close()


def transport(smtp_url: str | None, outbox: Path) -> Transport:
    """SMTP when a URL is given, else the Maildir outbox."""
    if smtp_url:
        return SmtpTransport(SmtpSettings.from_url(smtp_url))
    return MaildirTransport(outbox)


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
