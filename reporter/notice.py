"""Tell a report's owners when deliveries failed for good: one email, throttled per report."""

from __future__ import annotations

import logging
from datetime import datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid, parseaddr

from reporter import defaults
from reporter.config import normalize_address
from reporter.deliver import SendResult
from reporter.errors import DeliveryError
from reporter.mail import SMTP_POLICY, addresses
from reporter.runtime import Runtime
from reporter.schedule import isoformat

log = logging.getLogger(__name__)


def notify_owners(rt: Runtime, result: SendResult, cooldown: float = defaults.NOTICE_COOLDOWN) -> bool:
    """Email the owners of RESULT's report about its failed recipients; True if a notice went out."""
    report = rt.config.reports.get(result.report)
    if not result.failed or report is None or not report.owners:
        return False
    previous = rt.ledger.take_notice(result.report, cooldown)
    if previous is None:
        log.info("owners of %s were told of a failure less than %ds ago; not telling them again", result.report, cooldown)
        return False
    sender = rt.config.sender_of(report)
    owners = [normalize_address(o) for o in report.owners]
    msg = EmailMessage(policy=SMTP_POLICY)
    msg["Subject"] = f"[reporter] {result.report}: {len(result.failed)} delivery(ies) failed for {isoformat(result.slot)}"
    msg["From"] = sender
    msg["To"] = ", ".join(owners)
    msg["Date"] = format_datetime(datetime.now().astimezone())
    msg["Message-ID"] = make_msgid(domain=parseaddr(sender)[1].rpartition("@")[2] or "reporter.invalid")
    msg["Auto-Submitted"] = "auto-generated"
    msg["X-Auto-Response-Suppress"] = "All"
    lines = [f"  {recipient}: {error}" for recipient, error in sorted(result.failed.items())]
    msg.set_content(
        "\n".join(
            [
                f"reporter could not deliver report {result.report!r} for slot {isoformat(result.slot)} to:",
                "",
                *lines,
                "",
                "These will not be retried. To see every failure:",
                f"  reporter history {result.report} --status failed",
                "",
                f"You are told at most once every {cooldown // 60:.0f} minutes per report.",
            ]
        )
    )
    mailer = rt.transport()
    try:
        mailer.send(msg, parseaddr(sender)[1], addresses(owners))
        log.warning("told the owners of %s about %d failed delivery(ies)", result.report, len(result.failed))
        return True
    except DeliveryError as exc:
        rt.ledger.give_back_notice(result.report, previous)
        log.error("could not tell the owners of %s about failed deliveries: %s", result.report, exc)
        return False
    finally:
        mailer.close()
