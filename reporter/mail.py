"""Emails: build the MIME message and hand it to SMTP or to a local Maildir.

Errors are sorted for the retry policy: TransientDeliveryError (4xx, connection trouble) is retried,
PermanentDeliveryError (5xx) is not. Every recipient refused is reported on its own. No header can
carry a line break or control character, and no error names the SMTP password.
"""

from __future__ import annotations

import functools
import hashlib
import mailbox
import smtplib
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import EmailPolicy
from email.utils import format_datetime, getaddresses, parseaddr
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, quote, unquote, urlsplit

from reporter import defaults
from reporter.audience import UNDISCLOSED
from reporter.charts import content_id
from reporter.config import normalize_address
from reporter.errors import ConfigError, PermanentDeliveryError, Problem, TransientDeliveryError
from reporter.render import Rendered, one_line
from reporter.schedule import isoformat
from reporter.settings import mask_url, scrub

UNFOLDED = frozenset({"message-id", "list-unsubscribe", "list-unsubscribe-post"})
"""Headers written on one line: some parsers read a folded Message-ID or List-Unsubscribe with a
leading space, which breaks threading, duplicate detection and unsubscribe buttons."""

MAX_LINE = 998
"""RFC 5322's limit on a header line; a longer UNFOLDED header is folded after all."""


class MailPolicy(EmailPolicy):
    """The SMTP policy (CRLF, folded at 78), except that UNFOLDED headers stay on one line (when ASCII
    and within MAX_LINE)."""

    def _one_line(self, name: str, value: Any) -> str | None:
        text = f"{name}: {str(value).strip()}"
        return text + self.linesep if name.lower() in UNFOLDED and text.isascii() and len(text) <= MAX_LINE else None

    def fold(self, name: str, value: Any) -> str:
        if (line := self._one_line(name, value)) is not None:
            return line
        folded: str = super().fold(name, value)
        return folded

    def fold_binary(self, name: str, value: Any) -> bytes:
        if (line := self._one_line(name, value)) is not None:
            return line.encode("ascii")
        return super().fold_binary(name, value)


SMTP_POLICY = MailPolicy(linesep="\r\n")


def list_headers(report: str, description: str | None, owners: Sequence[str], sender: str, unsubscribe_url: str | None) -> dict[str, str]:
    """The headers of an automated mailing (RFC 2369, 2919, 8058, and Outlook's auto-reply switch).

    List-Unsubscribe is a mailto: to the owners (the sender when there are none): a person decides.
    List-Unsubscribe-Post (one click, RFC 8058) is only valid beside an https URL, so it is added
    only when the report has an `unsubscribe_url`.
    """
    address = parseaddr(sender)[1]
    domain = address.rpartition("@")[2] if "@" in address else "reporter.invalid"
    label = one_line(description or report).replace("\\", "").replace('"', "'")
    contacts = [parseaddr(o)[1] for o in owners] or [address]
    subject = quote(f"unsubscribe {report}")
    links = [f"<mailto:{c}?subject={subject}>" for c in contacts]
    headers = {"List-Id": f'"{label}" <{report.lower()}.{domain}>'}
    if unsubscribe_url:
        links.insert(0, f"<{unsubscribe_url}>")
        headers["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    headers["List-Unsubscribe"] = ", ".join(links)
    # Outlook/Exchange: no out-of-office or other automatic replies to this message.
    headers["X-Auto-Response-Suppress"] = "All"
    headers["Precedence"] = "bulk"
    return headers


def message_id(report: str, slot: datetime, recipient: str, sender: str) -> str:
    """Deterministic Message-ID of (report, slot, recipient): a resend carries the same id."""
    digest = hashlib.sha256(f"{report}\x00{isoformat(slot)}\x00{recipient.lower()}".encode()).hexdigest()[:24]
    address = parseaddr(sender)[1]
    domain = address.rpartition("@")[2] if "@" in address else ""
    utc = slot.astimezone(UTC)
    return f"<{report}.{utc.strftime('%Y%m%dT%H%M%SZ')}.{digest}@{domain or 'reporter.invalid'}>"


def build(
    rendered: Rendered,
    sender: str,
    to: list[str],
    cc: list[str],
    msg_id: str,
    with_html: bool,
    headers: Mapping[str, str] | None = None,
) -> EmailMessage:
    """multipart/mixed( multipart/alternative(text, html), attachments… ).

    Every address is validated again here (ValueError if one is not an address), so nothing but an
    address reaches From, To or Cc whoever calls this.
    """
    msg = EmailMessage(policy=SMTP_POLICY)
    msg["Subject"] = one_line(rendered.subject)  # no CR, LF or control character reaches the header
    msg["From"] = normalize_address(sender)
    _set_own_headers(msg, to, cc, msg_id)
    msg["X-Reporter-Report"] = rendered.report
    msg["X-Reporter-Slot"] = isoformat(rendered.slot)
    msg["Auto-Submitted"] = "auto-generated"
    for name, value in (headers or {}).items():
        msg[name] = one_line(value)
    msg.set_content(rendered.text)
    if with_html:
        msg.add_alternative(rendered.html, subtype="html")
        html_part = msg.get_body(preferencelist=("html",))
        for chart in rendered.charts:
            cid = content_id(rendered.report, chart.name)
            if html_part is not None and f"cid:{cid}" in rendered.html:
                # multipart/related around the HTML: the PNG shows in place, not as an attachment.
                html_part.add_related(chart.png, "image", "png", cid=f"<{cid}>", filename=f"{chart.name}.png", disposition="inline")
    for filename, mime, content in rendered.attachments():
        maintype, subtype = mime.split("/")
        # Text attachments are UTF-8; saying so keeps mail clients and spreadsheets from guessing.
        params = {"charset": "utf-8"} if maintype == "text" else None
        msg.add_attachment(content, maintype=maintype, subtype=subtype, filename=filename, params=params)
    return msg


def _set_own_headers(msg: EmailMessage, to: Sequence[str], cc: Sequence[str], msg_id: str) -> None:
    """The headers that differ between the messages of one render: To, Cc, Date and Message-ID."""
    # A message for Cc/Bcc readers only still needs a To header: the empty group of RFC 5322.
    msg["To"] = ", ".join(normalize_address(a) for a in to) if to else UNDISCLOSED
    if cc:
        msg["Cc"] = ", ".join(normalize_address(a) for a in cc)
    msg["Date"] = format_datetime(datetime.now().astimezone())
    msg["Message-ID"] = msg_id


def _fields(msg: EmailMessage) -> bytes:
    """MSG's header fields as the SMTP generator writes them (folded, CRLF after each)."""
    return b"".join(SMTP_POLICY.fold_binary(name, value) for name, value in msg.raw_items())


def _split_fields(head: bytes) -> list[bytes]:
    """A flattened header block (CRLF after each line) cut into fields, folded lines kept with their field."""
    out: list[bytes] = []
    for line in head.split(b"\r\n")[:-1]:
        if line[:1] in (b" ", b"\t") and out:
            out[-1] += line + b"\r\n"
        else:
            out.append(line + b"\r\n")
    return out


@dataclass(frozen=True)
class Outgoing:
    """One message as it goes on the wire: its own header block and the body it shares with every
    other message of the same render (encoded once, not once per recipient)."""

    head: bytes
    """Header fields, each ending in CRLF."""
    body: bytes
    """The blank line after the headers and the MIME body."""
    eight_bit: bool
    """Whether a part is sent as 8bit (the server must offer 8BITMIME, or it is re-encoded)."""
    message: Callable[[], EmailMessage]
    """The same message as an EmailMessage, for the rare paths that must re-encode it."""

    @property
    def size(self) -> int:
        """Bytes handed to the server."""
        return len(self.head) + len(self.body)

    def as_bytes(self, extra: Mapping[str, str] | None = None) -> bytes:
        """The whole message, with EXTRA headers (already safe values) after the others."""
        if not extra:
            return self.head + self.body
        more = EmailMessage(policy=SMTP_POLICY)
        for name, value in extra.items():
            more[name] = value
        return self.head + _fields(more) + self.body


def _has_8bit(msg: EmailMessage) -> bool:
    return any(part.get("Content-Transfer-Encoding", "").lower() == "8bit" for part in msg.walk())


PLACEHOLDER_ID = "<placeholder@reporter.invalid>"
"""The Message-ID of a MessageFactory's template, replaced in every message it makes."""


class MessageFactory:
    """The messages of one render: the body (text, HTML, charts, PDF, CSV, XLSX) is built and encoded
    once; each message gets only its own To, Cc, Date and Message-ID.

    Every message is, once parsed, the message `build` makes for the same arguments (tests/test_mail.py).
    """

    def __init__(self, rendered: Rendered, sender: str, with_html: bool, headers: Mapping[str, str] | None = None) -> None:
        self._args = (rendered, sender, with_html, headers)
        template = build(rendered, sender, [], [], PLACEHOLDER_ID, with_html, headers)
        self.eight_bit = _has_8bit(template)
        head, _, body = template.as_bytes().partition(b"\r\n\r\n")
        fields = _split_fields(head + b"\r\n")
        names = [f.split(b":", 1)[0].lower() for f in fields]
        # build() writes Subject, From, then the message's own To, Date and Message-ID (no Cc here).
        first, last = names.index(b"to"), names.index(b"message-id")
        assert names[first : last + 1] == [b"to", b"date", b"message-id"], names
        self._before = b"".join(fields[:first])
        self._after = b"".join(fields[last + 1 :])
        self._body = b"\r\n" + body

    def outgoing(self, to: Sequence[str], cc: Sequence[str], msg_id: str) -> Outgoing:
        """The message to TO and CC (validated as in `build`) with Message-ID MSG_ID; Bcc is never in it."""
        own = EmailMessage(policy=SMTP_POLICY)
        _set_own_headers(own, to, cc, msg_id)
        rendered, sender, with_html, headers = self._args
        to, cc = list(to), list(cc)
        return Outgoing(
            self._before + _fields(own) + self._after,
            self._body,
            self.eight_bit,
            lambda: build(rendered, sender, to, cc, msg_id, with_html, headers),
        )


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

    def send(self, msg: EmailMessage | Outgoing, sender: str, recipients: list[str], blind: list[str] | None = None) -> Outcome:
        """Hand MSG to RECIPIENTS and to the BLIND (Bcc) addresses, which no stored copy names."""
        ...

    def close(self) -> None: ...

    def describe(self) -> str: ...


class MaildirTransport:
    """Writes each message as a file in a Maildir (the embedded default: no mail server needed)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._box = open_maildir(path)

    def connect(self) -> None:
        pass

    def send(self, msg: EmailMessage | Outgoing, sender: str, recipients: list[str], blind: list[str] | None = None) -> Outcome:
        # One file stands for the message handed over; Bcc addresses are only counted here (the
        # ledger has them), since anything written into the file is readable by whoever reads it.
        extra = {}
        if recipients:
            extra["X-Reporter-Envelope-To"] = ", ".join(recipients)
        if blind:
            extra["X-Reporter-Bcc-Count"] = str(len(blind))
        if isinstance(msg, Outgoing):
            data = msg.as_bytes(extra)
        else:
            del msg["X-Reporter-Envelope-To"]
            del msg["X-Reporter-Bcc-Count"]
            for name, value in extra.items():
                msg[name] = value
            data = msg.as_bytes()
        try:
            self._box.add(data)
        except OSError as exc:
            # A full disk or a folder made read-only can be fixed; the rows go back for a retry.
            raise TransientDeliveryError(f"cannot write to the outbox {self.path}: {exc.strerror or exc}") from None
        return Outcome()

    def close(self) -> None:
        self._box.close()

    def describe(self) -> str:
        return f"Maildir {self.path.resolve()}/new"


MAILDIR_PARTS = ("tmp", "new", "cur")


def open_maildir(path: Path) -> mailbox.Maildir:
    """The Maildir at PATH, created if PATH is missing or an empty folder; else a ConfigError saying why not."""

    def problem(why: str) -> ConfigError:
        return ConfigError([Problem("REPORTER_OUTBOX", None, "", f"{path}: {why}")])

    try:
        if path.exists() and not path.is_dir():
            raise problem("is a file, not a folder; point REPORTER_OUTBOX at a new or empty folder")
        if path.is_dir() and not all((path / part).is_dir() for part in MAILDIR_PARTS):
            if any(path.iterdir()):
                raise problem("is a folder with other files in it, not a Maildir (no tmp, new and cur); use a new or empty folder")
        for part in MAILDIR_PARTS:
            (path / part).mkdir(parents=True, exist_ok=True)
        probe = path / "tmp" / f".reporter-probe-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise problem(f"cannot be used as the outbox: {exc.strerror or exc}") from None
    return mailbox.Maildir(str(path), create=False)


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
        conn: smtplib.SMTP
        if s.ssl:
            conn = smtplib.SMTP_SSL(s.host, s.port, timeout=s.timeout, context=tls_context())
        else:
            conn = smtplib.SMTP(s.host, s.port, timeout=s.timeout)
        try:
            conn.ehlo()
            if s.starttls:
                conn.starttls(context=tls_context())
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

    def send(self, msg: EmailMessage | Outgoing, sender: str, recipients: list[str], blind: list[str] | None = None) -> Outcome:
        try:
            if self._conn is None:
                self._conn = self._connect()
            # Bcc lives in the envelope only: the message itself never carries a Bcc header.
            envelope = [*recipients, *(blind or [])]
            refused = self._hand_over(self._conn, msg, sender, envelope)
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

    @staticmethod
    def _hand_over(conn: smtplib.SMTP, msg: EmailMessage | Outgoing, sender: str, envelope: list[str]) -> dict[str, tuple[int, bytes]]:
        """One SMTP transaction; the refused recipients."""
        if isinstance(msg, Outgoing):
            if all(a.isascii() for a in (sender, *envelope)) and (not msg.eight_bit or conn.has_extn("8bitmime")):
                # The common case: the bytes encoded once per render, sent as they are.
                return conn.sendmail(sender, envelope, msg.as_bytes(), mail_options=["BODY=8BITMIME"] if msg.eight_bit else [])
            # SMTPUTF8, or a 7-bit server that needs the body re-encoded: the full message, as before.
            msg = msg.message()
        return conn.send_message(msg, from_addr=sender, to_addrs=envelope, mail_options=body_options(conn, msg, sender, envelope))

    def probe(self) -> None:
        """Connect, EHLO, STARTTLS and log in as configured, then QUIT; DeliveryError saying why not."""
        try:
            conn = self._connect()
        except (smtplib.SMTPException, OSError) as exc:
            raise TransientDeliveryError(self._scrub(f"{type(exc).__name__}: {exc}")) from None
        try:
            conn.quit()
        except (smtplib.SMTPException, OSError):
            conn.close()

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


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The client TLS context, built once per process and only when TLS is used (it costs 20-30 ms:
    the system CA store is read each time)."""
    return ssl.create_default_context()


def body_options(conn: smtplib.SMTP, msg: EmailMessage, sender: str, envelope: Sequence[str]) -> list[str]:
    """MAIL FROM options for MSG: BODY=8BITMIME for an 8-bit body when the server offers it.

    smtplib adds SMTPUTF8 and BODY=8BITMIME itself for a non-ASCII address (when offered), so
    nothing is added then. A server without 8BITMIME gets the body re-encoded as quoted-printable.
    """
    if not any(part.get("Content-Transfer-Encoding", "").lower() == "8bit" for part in msg.walk()):
        return []
    if not all(a.isascii() for a in (sender, *envelope)) and conn.has_extn("smtputf8"):
        return []
    if conn.has_extn("8bitmime"):
        return ["BODY=8BITMIME"]
    seven_bit(msg)
    return []


def seven_bit(msg: EmailMessage) -> None:
    """Re-encode MSG's 8-bit text parts as quoted-printable, for a server that takes 7-bit only."""
    for part in msg.walk():
        if isinstance(part, EmailMessage) and part.get("Content-Transfer-Encoding", "").lower() == "8bit":
            part.set_content(part.get_content(), subtype=part.get_content_subtype(), cte="quoted-printable")


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
