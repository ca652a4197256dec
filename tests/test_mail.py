"""reporter.mail: Message-IDs, MIME structure, SMTP URLs, the Maildir outbox and SMTP against aiosmtpd."""

from __future__ import annotations

import email
import email.policy
import mailbox
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage, Message
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from reporter.errors import ConfigError, PermanentDeliveryError, TransientDeliveryError
from reporter.mail import MaildirTransport, SmtpSettings, SmtpTransport, build, list_headers, message_id, open_maildir, seven_bit
from reporter.render import Rendered
from reporter.runner import free_port
from tests.conftest import Inbox, serving

SENDER = "Reports <reports@example.com>"
SLOT = datetime(2026, 7, 1, 5, 0, tzinfo=UTC)
# dot-atom-text "@" dot-atom-text (RFC 5322 msg-id, without the obsolete and domain-literal forms).
ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
MSG_ID_RE = re.compile(rf"^<{ATOM}(?:\.{ATOM})*@{ATOM}(?:\.{ATOM})*>$")

PDF = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\nnot really a pdf, only bytes to carry\n%%EOF\n"
CSV = b"region,amount\r\nAtlantis,1234.5\r\n"


def rendered(subject: str = "Sales Wednesday 01 July", pdf: bytes | None = PDF, csv: bytes | None = CSV) -> Rendered:
    return Rendered(
        report="sales-daily",
        slot=SLOT,
        subject=subject,
        html="<html><body><h1>Sales</h1><p>1,234.50 EUR</p></body></html>",
        text="Sales\n1,234.50 EUR\n",
        pdf=pdf,
        csv=csv,
        row_count=1,
    )


def reparse(msg: EmailMessage) -> EmailMessage:
    """The message as a receiving mail client sees it: serialised to bytes and parsed back."""
    parsed = email.message_from_bytes(msg.as_bytes(), policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def content_types(msg: Message) -> list[str]:
    return [part.get_content_type() for part in msg.walk()]


# --------------------------------------------------------------------------- message_id


def test_message_id_is_deterministic() -> None:
    first = message_id("sales-daily", SLOT, "ann@example.com", SENDER)
    assert first == message_id("sales-daily", SLOT, "ann@example.com", SENDER)
    # The recipient's case does not make a different message.
    assert first == message_id("sales-daily", SLOT, "Ann@Example.COM", SENDER)


@pytest.mark.parametrize(
    ("report", "slot", "recipient"),
    [
        ("sales-daily", SLOT, "ben@example.com"),
        ("sales-daily", datetime(2026, 7, 2, 5, 0, tzinfo=UTC), "ann@example.com"),
        ("sales-daily", datetime(2026, 7, 1, 5, 1, tzinfo=UTC), "ann@example.com"),
        ("signups", SLOT, "ann@example.com"),
    ],
    ids=["other-recipient", "other-day", "other-minute", "other-report"],
)
def test_message_id_differs_per_report_slot_and_recipient(report: str, slot: datetime, recipient: str) -> None:
    assert message_id(report, slot, recipient, SENDER) != message_id("sales-daily", SLOT, "ann@example.com", SENDER)


def test_message_id_names_one_instant_whatever_zone_it_is_written_in() -> None:
    berlin = SLOT.astimezone(ZoneInfo("Europe/Berlin"))
    assert berlin == SLOT
    assert message_id("sales-daily", berlin, "ann@example.com", SENDER) == message_id("sales-daily", SLOT, "ann@example.com", SENDER)


@pytest.mark.parametrize(
    ("sender", "domain"),
    [
        ("Reports <reports@example.com>", "example.com"),
        ("reports@mail.example.org", "mail.example.org"),
        ('"Data, Team" <data@corp.example.net>', "corp.example.net"),
        ("no address here", "reporter.invalid"),
    ],
)
def test_message_id_is_valid_and_uses_the_senders_domain(sender: str, domain: str) -> None:
    value = message_id("sales-daily", SLOT, "ann@example.com", sender)
    assert MSG_ID_RE.match(value), value
    assert value.endswith(f"@{domain}>")
    assert "sales-daily" in value
    assert "20260701T050000Z" in value


# --------------------------------------------------------------------------- build


def test_build_makes_text_and_html_alternatives_and_attachments() -> None:
    msg_id = message_id("sales-daily", SLOT, "ann@example.com", SENDER)
    msg = reparse(build(rendered(), SENDER, ["Ann <ann@example.com>"], ["boss@example.com"], msg_id, with_html=True))

    assert msg.get_content_type() == "multipart/mixed"
    assert msg["Subject"] == "Sales Wednesday 01 July"
    assert msg["From"] == SENDER
    assert msg["To"] == "Ann <ann@example.com>"
    assert msg["Cc"] == "boss@example.com"
    assert msg["Message-ID"] == msg_id  # never folded: no leading space for a parser to keep
    assert msg["X-Reporter-Report"] == "sales-daily"
    assert msg["X-Reporter-Slot"] == "2026-07-01T05:00:00Z"
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg["Date"] is not None

    alternative, *attachments = msg.iter_parts()
    assert alternative.get_content_type() == "multipart/alternative"
    assert content_types(alternative)[1:] == ["text/plain", "text/html"]
    body = msg.get_body(preferencelist=("plain",))
    assert body is not None and "1,234.50 EUR" in body.get_content()
    html = msg.get_body(preferencelist=("html",))
    assert html is not None and "<h1>Sales</h1>" in html.get_content()

    assert [(a.get_content_type(), a.get_filename()) for a in attachments] == [
        ("application/pdf", "sales-daily-2026-07-01_0500.pdf"),
        ("text/csv", "sales-daily-2026-07-01_0500.csv"),
    ]
    assert all(a.get_content_disposition() == "attachment" for a in attachments)
    assert attachments[0].get_payload(decode=True) == PDF
    assert attachments[1].get_payload(decode=True) == CSV
    assert attachments[1].get_content_charset() == "utf-8"
    assert attachments[0].get_content_charset() is None


def test_build_without_html_has_no_html_part() -> None:
    msg = reparse(build(rendered(), SENDER, ["ann@example.com"], [], "<x@example.com>", with_html=False))
    types = content_types(msg)
    assert "text/html" not in types
    assert "text/plain" in types
    assert "application/pdf" in types and "text/csv" in types
    assert msg["Cc"] is None


def test_build_without_html_or_attachments_is_plain_text() -> None:
    msg = reparse(build(rendered(pdf=None, csv=None), SENDER, ["ann@example.com"], [], "<x@example.com>", with_html=False))
    assert content_types(msg) == ["text/plain"]
    assert "1,234.50 EUR" in msg.get_content()


@pytest.mark.parametrize(
    "subject",
    [
        "Sales\r\nBcc: evil@example.net",
        "Sales\nBcc: evil@example.net",
        "Sales\rBcc: evil@example.net",
        "Sales\r\n\r\nBcc: evil@example.net",
        "Sales\u2028Bcc: evil@example.net",
    ],
    ids=["crlf", "lf", "cr", "blank-line", "line-separator"],
)
def test_subject_cannot_inject_a_header(subject: str) -> None:
    msg = build(rendered(subject=subject), SENDER, ["ann@example.com"], [], "<x@example.com>", with_html=True)
    raw = msg.as_bytes()
    assert b"\r\nBcc:" not in raw and b"\nBcc:" not in raw
    parsed = reparse(msg)
    assert parsed["Bcc"] is None
    assert parsed["Subject"] == "Sales Bcc: evil@example.net"
    # The body is still the body: the injection did not end the headers early.
    assert parsed.get_content_type() == "multipart/mixed"


def test_non_ascii_subject_survives_the_round_trip() -> None:
    msg = reparse(build(rendered(subject="Umsätze für Köln — 5 €"), SENDER, ["ann@example.com"], [], "<x@example.com>", with_html=True))
    assert msg["Subject"] == "Umsätze für Köln — 5 €"


# --------------------------------------------------------------------------- SmtpSettings.from_url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("smtp://localhost", SmtpSettings("localhost", 25, False, False, None, None, 30.0)),
        ("smtp://mail.example.com:2525", SmtpSettings("mail.example.com", 2525, False, False, None, None, 30.0)),
        ("smtps://mail.example.com", SmtpSettings("mail.example.com", 465, True, False, None, None, 30.0)),
        ("smtps://mail.example.com:1465", SmtpSettings("mail.example.com", 1465, True, False, None, None, 30.0)),
        ("smtp://mail.example.com:587?starttls=true", SmtpSettings("mail.example.com", 587, False, True, None, None, 30.0)),
        ("smtp://mail.example.com?starttls=false&timeout=5", SmtpSettings("mail.example.com", 25, False, False, None, None, 5.0)),
        ("smtp://bot:hunter2@mail.example.com:587?starttls=1", SmtpSettings("mail.example.com", 587, False, True, "bot", "hunter2", 30.0)),
        (
            "smtp://bot%40example.com:p%40ss%3Aw%2Frd%25@mail.example.com",
            SmtpSettings("mail.example.com", 25, False, False, "bot@example.com", "p@ss:w/rd%", 30.0),
        ),
        ("smtp://[::1]:1025", SmtpSettings("::1", 1025, False, False, None, None, 30.0)),
    ],
)
def test_smtp_settings_from_url(url: str, expected: SmtpSettings) -> None:
    assert SmtpSettings.from_url(url) == expected


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("http://bot:s3cretpw@mail.example.com", "must start with smtp:// or smtps://"),
        ("mail.example.com:25", "must start with smtp:// or smtps://"),
        ("", "must start with smtp:// or smtps://"),
        ("smtp://bot:s3cretpw@", "names no host"),
        ("smtp://bot:s3cretpw@[::1", "not a valid URL"),
        ("smtp://bot:s3cretpw@mail.example.com:notaport", "not a valid URL"),
        ("smtp://bot:s3cretpw@mail.example.com:99999", "not a valid URL"),
        ("smtp://bot:s3cretpw@mail.example.com?timeout=soon", "timeout"),
        # A '/' in a password that was not %-escaped: the URL is misread, the password must not show.
        ("smtp://bot:s3cret/pw@mail.example.com", "not a valid URL"),
    ],
    ids=["http", "no-scheme", "empty", "no-host", "bad-ipv6", "bad-port", "port-out-of-range", "bad-timeout", "unescaped-slash"],
)
def test_bad_smtp_url_is_a_config_error_without_the_password(url: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        SmtpSettings.from_url(url)
    text = str(info.value)
    assert "REPORTER_SMTP_URL" in text
    assert fragment in text
    for secret in ("s3cretpw", "s3cret/pw", "s3cret"):
        assert secret not in text


# --------------------------------------------------------------------------- Maildir


def test_maildir_transport_writes_a_readable_message(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    transport = MaildirTransport(outbox)
    msg_id = message_id("sales-daily", SLOT, "ann@example.com", SENDER)
    outcome = transport.send(
        build(rendered(), SENDER, ["ann@example.com"], [], msg_id, True), "reports@example.com", ["ann@example.com", "hidden@example.com"]
    )
    transport.close()
    assert outcome.refused == {}

    files = list((outbox / "new").iterdir())
    assert len(files) == 1
    saved = email.message_from_bytes(files[0].read_bytes(), policy=email.policy.default)
    assert saved["Message-ID"].strip() == msg_id
    assert saved["Subject"] == "Sales Wednesday 01 July"
    assert saved["X-Reporter-Envelope-To"] == "ann@example.com, hidden@example.com"
    assert "application/pdf" in content_types(saved)
    # And the standard library reads it back as a Maildir.
    assert [m["Message-ID"].strip() for m in mailbox.Maildir(str(outbox), create=False)] == [msg_id]


def test_maildir_transport_keeps_one_file_per_message(tmp_path: Path) -> None:
    transport = MaildirTransport(tmp_path / "outbox")
    for who in ("ann@example.com", "ben@example.com"):
        transport.send(
            build(rendered(), SENDER, [who], [], message_id("sales-daily", SLOT, who, SENDER), True), "reports@example.com", [who]
        )
    transport.close()
    saved = [email.message_from_bytes(p.read_bytes(), policy=email.policy.default) for p in (tmp_path / "outbox" / "new").iterdir()]
    assert sorted(m["To"] for m in saved) == ["ann@example.com", "ben@example.com"]


# --------------------------------------------------------------------------- SMTP against aiosmtpd


def smtp_message(to: str = "ann@example.com") -> EmailMessage:
    return build(rendered(), SENDER, [to], [], message_id("sales-daily", SLOT, to, SENDER), with_html=True)


def test_smtp_send_arrives(inbox: Inbox) -> None:
    transport = SmtpTransport(SmtpSettings.from_url(inbox.url))
    try:
        outcome = transport.send(smtp_message(), "reports@example.com", ["ann@example.com", "bcc@example.com"])
    finally:
        transport.close()
    assert outcome.refused == {}
    assert inbox.envelopes == [("reports@example.com", ["ann@example.com", "bcc@example.com"])]
    [received] = inbox.messages
    assert received["Message-ID"].strip() == message_id("sales-daily", SLOT, "ann@example.com", SENDER)
    assert received["Subject"] == "Sales Wednesday 01 July"
    assert received["Bcc"] is None
    pdf = [p for p in received.walk() if p.get_content_type() == "application/pdf"]
    assert [p.get_payload(decode=True) for p in pdf] == [PDF]


def test_smtp_reuses_its_connection_for_several_messages(inbox: Inbox) -> None:
    transport = SmtpTransport(SmtpSettings.from_url(inbox.url))
    try:
        for who in ("ann@example.com", "ben@example.com", "cy@example.com"):
            transport.send(smtp_message(who), "reports@example.com", [who])
    finally:
        transport.close()
    assert [rcpts for _, rcpts in inbox.envelopes] == [["ann@example.com"], ["ben@example.com"], ["cy@example.com"]]


def test_smtp_451_is_transient_and_the_next_send_succeeds(inbox: Inbox) -> None:
    inbox.script.append("451 4.3.0 try later")
    transport = SmtpTransport(SmtpSettings.from_url(inbox.url))
    try:
        with pytest.raises(TransientDeliveryError, match="451") as info:
            transport.send(smtp_message(), "reports@example.com", ["ann@example.com"])
        assert not isinstance(info.value, PermanentDeliveryError)
        assert inbox.messages == []
        # A retry on the same transport reconnects and delivers.
        transport.send(smtp_message(), "reports@example.com", ["ann@example.com"])
    finally:
        transport.close()
    assert len(inbox.messages) == 1


def test_smtp_550_is_permanent(inbox: Inbox) -> None:
    inbox.script.append("550 5.1.1 no such user")
    transport = SmtpTransport(SmtpSettings.from_url(inbox.url))
    try:
        with pytest.raises(PermanentDeliveryError, match="550") as info:
            transport.send(smtp_message(), "reports@example.com", ["ann@example.com"])
    finally:
        transport.close()
    assert "no such user" in str(info.value)
    assert inbox.messages == []


def test_smtp_closed_port_is_transient() -> None:
    port = free_port()  # bound and released: nothing listens there now
    transport = SmtpTransport(SmtpSettings.from_url(f"smtp://127.0.0.1:{port}?timeout=5"))
    try:
        with pytest.raises(TransientDeliveryError, match="unreachable"):
            transport.send(smtp_message(), "reports@example.com", ["ann@example.com"])
    finally:
        transport.close()


# --------------------------------------------------------------------------- headers of an automated mailing


def test_long_message_id_is_written_on_one_line() -> None:
    msg_id = message_id("a-rather-long-report-name-for-the-finance-department", SLOT, "ann@example.com", "r@reports.example.co.uk")
    raw = build(rendered(), SENDER, ["ann@example.com"], [], msg_id, True).as_bytes()
    assert f"\r\nMessage-ID: {msg_id}\r\n".encode() in raw
    assert len(f"Message-ID: {msg_id}") > 78  # long enough that the SMTP policy would have folded it
    assert reparse_bytes(raw)["Message-ID"] == msg_id


def reparse_bytes(raw: bytes) -> EmailMessage:
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


@pytest.mark.parametrize(
    ("description", "owners", "url", "expected"),
    [
        (
            "Orders by region",
            ["Data <data@example.com>", "ops@example.com"],
            None,
            {
                "List-Id": '"Orders by region" <sales-daily.example.com>',
                "List-Unsubscribe": "<mailto:data@example.com?subject=unsubscribe%20sales-daily>, "
                "<mailto:ops@example.com?subject=unsubscribe%20sales-daily>",
                "X-Auto-Response-Suppress": "All",
                "Precedence": "bulk",
            },
        ),
        (
            None,
            [],
            "https://example.com/unsub?r=sales-daily",
            {
                "List-Id": '"sales-daily" <sales-daily.example.com>',
                "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
                "List-Unsubscribe": "<https://example.com/unsub?r=sales-daily>, "
                "<mailto:reports@example.com?subject=unsubscribe%20sales-daily>",
                "X-Auto-Response-Suppress": "All",
                "Precedence": "bulk",
            },
        ),
        (
            'Quotes "and" \\ backslash\nnewline',
            ["o@example.com"],
            None,
            {
                "List-Id": "\"Quotes 'and'  backslash newline\" <sales-daily.example.com>",
                "List-Unsubscribe": "<mailto:o@example.com?subject=unsubscribe%20sales-daily>",
                "X-Auto-Response-Suppress": "All",
                "Precedence": "bulk",
            },
        ),
    ],
)
def test_list_headers(description: str | None, owners: list[str], url: str | None, expected: dict[str, str]) -> None:
    assert list_headers("sales-daily", description, owners, SENDER, url) == expected


def test_list_headers_survive_the_round_trip() -> None:
    headers = list_headers("sales-daily", "Orders by region", ["data@example.com"], SENDER, "https://example.com/u")
    msg = reparse(build(rendered(), SENDER, ["ann@example.com"], [], "<x@example.com>", True, headers))
    for name, value in headers.items():
        assert msg[name] == value


def test_long_list_unsubscribe_and_message_id_stay_on_one_line() -> None:
    owners = ["data-team@example.com", "analytics-on-call@example.com"]
    headers = list_headers("sales-daily", "Orders of the day by region, with every order listed", owners, SENDER, "https://example.com/u")
    msg_id = message_id("sales-daily", SLOT, "ann@example.com", SENDER)
    raw = build(rendered(), SENDER, ["ann@example.com"], [], msg_id, True, headers).as_bytes()
    lines = raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    unsubscribe = [line for line in lines if line.startswith(b"List-Unsubscribe:")]
    assert len(unsubscribe) == 1 and len(unsubscribe[0]) > 78, "long enough that the policy would fold it"
    assert unsubscribe[0] == f"List-Unsubscribe: {headers['List-Unsubscribe']}".encode()
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert parsed["List-Unsubscribe"] == headers["List-Unsubscribe"]  # no leading space for a parser to keep
    assert parsed["Message-ID"] == msg_id
    assert str(parsed["List-Id"]).startswith('"Orders of the day')  # folded as usual, and still read back whole


# --------------------------------------------------------------------------- 8-bit bodies


@dataclass
class OptionsInbox(Inbox):
    """An inbox that also keeps the MAIL FROM options of each message."""

    options: list[list[str]] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.options.append(list(envelope.mail_options))
        return await super().handle_DATA(server, session, envelope)


def utf8_message(to: str = "ann@example.com") -> EmailMessage:
    body = Rendered("sales-daily", SLOT, "Umsatz Zürich", "<p>Zürich: 1.234,50 €</p>", "Zürich: 1.234,50 €\n", None, None, 1)
    return build(body, SENDER, [to], [], "<x@example.com>", True)


def test_an_8bit_body_goes_with_body_8bitmime_when_offered() -> None:
    with serving(OptionsInbox("127.0.0.1", free_port())) as box:
        transport = SmtpTransport(SmtpSettings.from_url(box.url))
        try:
            transport.send(utf8_message(), "reports@example.com", ["ann@example.com"])
            transport.send(
                build(rendered(), SENDER, ["ann@example.com"], [], "<y@example.com>", True), "reports@example.com", ["ann@example.com"]
            )
        finally:
            transport.close()
    body_options = [[o for o in options if o.startswith("BODY=")] for options in box.options]
    assert body_options == [["BODY=8BITMIME"], []]  # an ASCII-only message needs no option
    text = box.messages[0].get_body(preferencelist=("plain",))
    assert text is not None and text.get_content().rstrip() == "Zürich: 1.234,50 €"


def test_without_8bitmime_the_body_is_reencoded_as_quoted_printable() -> None:
    msg = utf8_message()
    assert any(p.get("Content-Transfer-Encoding") == "8bit" for p in msg.walk())
    seven_bit(msg)
    raw = msg.as_bytes()
    assert raw.isascii()
    parsed = reparse_bytes(raw)
    assert [p.get("Content-Transfer-Encoding") for p in parsed.walk() if p.get_content_maintype() == "text"] == ["quoted-printable"] * 2
    html = parsed.get_body(preferencelist=("html",))
    assert html is not None and html.get_content().rstrip() == "<p>Zürich: 1.234,50 €</p>"


# --------------------------------------------------------------------------- the outbox


def test_an_empty_existing_folder_becomes_the_maildir(tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    transport = MaildirTransport(folder)
    transport.send(smtp_message(), "reports@example.com", ["ann@example.com"])
    transport.close()
    assert len(list((folder / "new").iterdir())) == 1


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda p: p.write_text("x"), "is a file, not a folder"),
        (lambda p: (p.mkdir(), (p / "notes.txt").write_text("mine")), "is a folder with other files in it, not a Maildir"),
    ],
)
def test_an_unusable_outbox_is_a_config_error_naming_it(tmp_path: Path, make: Any, why: str) -> None:
    path = tmp_path / "outbox"
    make(path)
    with pytest.raises(ConfigError) as caught:
        open_maildir(path)
    assert str(caught.value).startswith(f"REPORTER_OUTBOX: {path}: {why}")


def test_an_outbox_that_breaks_after_start_up_hands_the_message_back_for_a_retry(tmp_path: Path) -> None:
    transport = MaildirTransport(tmp_path / "outbox")
    (tmp_path / "outbox" / "tmp").rmdir()
    (tmp_path / "outbox" / "tmp").write_text("not a folder any more")  # as a full or broken disk would
    with pytest.raises(TransientDeliveryError, match=rf"cannot write to the outbox {tmp_path / 'outbox'}: "):
        transport.send(smtp_message(), "reports@example.com", ["ann@example.com"])
    transport.close()
    assert list((tmp_path / "outbox" / "new").iterdir()) == []


# --------------------------------------------------------------------------- one body for every message


def charted() -> Rendered:
    """A render with every kind of part: text, HTML with an inline chart, PDF, CSV and XLSX, non-ASCII text."""
    from reporter.charts import RenderedChart, content_id

    cid = content_id("sales-daily", "revenue")
    chart = RenderedChart(name="revenue", title="Revenue", svg="<svg/>", png=b"\x89PNG\r\n\x1a\nnot really a png", width=600, height=300)
    return Rendered(
        report="sales-daily",
        slot=SLOT,
        subject="Umsätze für Köln — 5 €",
        html=f'<html><body><h1>Zürich</h1><img src="cid:{cid}"><p>1.234,50 €</p></body></html>',
        text="Zürich\n1.234,50 €\n",
        pdf=PDF,
        csv=CSV,
        row_count=1,
        xlsx=b"PK\x03\x04 not really a workbook",
        charts=(chart,),
    )


def parts(msg: EmailMessage) -> list[tuple[str, dict[str, str], str | None, str | None, Any]]:
    """Every MIME part as a reader sees it: type, parameters (boundaries aside), disposition, filename, content."""
    out = []
    for part in msg.walk():
        params = {k: v for k, v in part.get_params() or [] if k != "boundary"}
        payload = b"" if part.is_multipart() else part.get_payload(decode=True)
        out.append((part.get_content_type(), params, part.get_content_disposition(), part.get_filename(), payload))
    return out


def headers_but_date(msg: EmailMessage) -> list[tuple[str, str]]:
    return [(name, str(value)) for name, value in msg.items() if name.lower() not in ("date", "content-type")]


@pytest.mark.parametrize(
    ("to", "cc"),
    [
        (["Ann <ann@example.com>"], []),
        (["ann@example.com", "ben@example.com"], ["Boss <boss@example.com>", "cy@example.com"]),
        ([], ["boss@example.com"]),  # a message for Cc/Bcc readers only: To is the empty group
    ],
    ids=["one-to", "to-and-cc", "cc-only"],
)
@pytest.mark.parametrize("with_html", [True, False])
def test_factory_messages_parse_to_what_build_makes(to: list[str], cc: list[str], with_html: bool) -> None:
    from reporter.mail import MessageFactory

    body = charted()
    headers = list_headers("sales-daily", "Orders of the day", ["data@example.com"], SENDER, "https://example.com/unsub")
    msg_id = message_id("sales-daily", SLOT, (to or cc)[0], SENDER)
    made = MessageFactory(body, SENDER, with_html, headers).outgoing(to, cc, msg_id)
    ours = reparse_bytes(made.as_bytes())
    theirs = reparse(build(body, SENDER, to, cc, msg_id, with_html, headers))
    assert headers_but_date(ours) == headers_but_date(theirs)
    assert ours["Date"] is not None
    assert parts(ours) == parts(theirs)
    assert made.size == len(made.as_bytes())
    assert made.eight_bit  # the non-ASCII text parts go as 8bit, as build() writes them


def test_each_factory_message_names_only_its_own_readers_and_never_a_bcc() -> None:
    from reporter.mail import MessageFactory

    factory = MessageFactory(rendered(), SENDER, True)
    first = factory.outgoing(["ann@example.com"], ["boss@example.com"], "<one@example.com>")
    second = factory.outgoing(["ben@example.com"], [], "<two@example.com>")
    assert first.body is second.body  # encoded once for both
    one, two = reparse_bytes(first.as_bytes()), reparse_bytes(second.as_bytes())
    assert (one["To"], one["Cc"], one["Message-ID"]) == ("ann@example.com", "boss@example.com", "<one@example.com>")
    assert (two["To"], two["Cc"], two["Message-ID"]) == ("ben@example.com", None, "<two@example.com>")
    assert b"ann@example.com" not in second.as_bytes() and b"boss@example.com" not in second.as_bytes()
    with pytest.raises(ValueError):
        factory.outgoing(["not an address\r\nBcc: evil@example.net"], [], "<three@example.com>")


def test_a_factory_message_over_smtp_keeps_bcc_in_the_envelope_only(inbox: Inbox, tmp_path: Path) -> None:
    from reporter.mail import MessageFactory

    msg = MessageFactory(rendered(), SENDER, True).outgoing(["ann@example.com"], ["boss@example.com"], "<one@example.com>")
    transport = SmtpTransport(SmtpSettings.from_url(inbox.url))
    try:
        outcome = transport.send(msg, "reports@example.com", ["ann@example.com", "boss@example.com"], blind=["hidden@example.com"])
    finally:
        transport.close()
    assert outcome.refused == {}
    assert inbox.envelopes == [("reports@example.com", ["ann@example.com", "boss@example.com", "hidden@example.com"])]
    [received] = inbox.messages
    assert received["Bcc"] is None and "hidden@example.com" not in received.as_string()
    assert received["Message-ID"] == "<one@example.com>"
    assert [p.get_payload(decode=True) for p in received.walk() if p.get_content_type() == "application/pdf"] == [PDF]

    outbox = MaildirTransport(tmp_path / "outbox")
    outbox.send(msg, "reports@example.com", ["ann@example.com", "boss@example.com"], blind=["hidden@example.com"])
    outbox.close()
    [stored] = (tmp_path / "outbox" / "new").iterdir()
    saved = reparse_bytes(stored.read_bytes())
    assert "hidden@example.com" not in stored.read_text()
    assert (saved["X-Reporter-Envelope-To"], saved["X-Reporter-Bcc-Count"]) == ("ann@example.com, boss@example.com", "1")
    assert parts(saved) == parts(reparse_bytes(msg.as_bytes()))


def test_a_factory_message_to_a_non_ascii_address_goes_with_smtputf8() -> None:
    from reporter.mail import MessageFactory

    # The bytes encoded for ASCII envelopes cannot carry this address: the full message goes instead,
    # with SMTPUTF8, as build()'s did.
    msg = MessageFactory(rendered(), SENDER, True).outgoing(["jörg@example.com"], [], "<one@example.com>")
    with serving(OptionsInbox("127.0.0.1", free_port())) as box:
        transport = SmtpTransport(SmtpSettings.from_url(box.url))
        try:
            assert transport.send(msg, "reports@example.com", ["jörg@example.com"]).refused == {}
        finally:
            transport.close()
    assert "SMTPUTF8" in box.options[0]
    [received] = box.messages
    assert (received["To"], received["Message-ID"]) == ("jörg@example.com", "<one@example.com>")


def test_plain_smtp_builds_no_tls_context(inbox: Inbox) -> None:
    # Reading the system CA store cost 20-30 ms on every connection, plain smtp:// included.
    from reporter.mail import tls_context

    tls_context.cache_clear()
    transport = SmtpTransport(SmtpSettings.from_url(inbox.url))
    try:
        transport.send(smtp_message(), "reports@example.com", ["ann@example.com"])
    finally:
        transport.close()
    assert len(inbox.messages) == 1
    assert tls_context.cache_info().misses == 0
    assert tls_context() is tls_context()  # and one per process when TLS is used
