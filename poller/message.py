"""Validate users' fields and build the notification email."""

from __future__ import annotations

import dataclasses
import re
import string
import unicodedata
from datetime import datetime, timezone
from decimal import Decimal, InvalidOperation
from email import headerregistry, policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, getaddresses, make_msgid
from typing import Any

from poller.settings import Rule

# Longer names are cut, so that a 10,000-character name neither bloats the
# message nor makes one header line too long to fold.
MAX_NAME_LENGTH = 200
MAX_ADDRESS_LENGTH = 254  # RFC 5321's limit on a forward path, less the brackets

# Deliberately narrower than RFC 5322: no quoted local parts, comments or
# address literals, which legitimate users' addresses practically never use.
_LOCAL_PART = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")
_DOMAIN_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


class _CachedHeaderRegistry(headerregistry.HeaderRegistry):
    """A HeaderRegistry that builds each header class once.

    The standard registry creates a new class with type() on every lookup,
    about 20 times per message, which was the largest single cost of
    building one (CPython 3.11).
    """

    def __init__(self) -> None:
        super().__init__()
        self._classes: dict[str, type[headerregistry.BaseHeader]] = {}

    def __getitem__(self, name: str) -> type[headerregistry.BaseHeader]:
        key = name.lower()
        header_class = self._classes.get(key)
        if header_class is None:
            header_class = super().__getitem__(name)
            self._classes[key] = header_class
        return header_class


# policy.SMTP (CRLF line ends, RFC 2047 for non-ASCII headers) with the cached registry.
MESSAGE_POLICY = policy.SMTP.clone(header_factory=_CachedHeaderRegistry())


class InvalidRow(ValueError):
    """A user row that cannot be notified; the message is the reason."""


def normalize_address(raw: Any) -> str:
    """Return a deliverable address, or raise InvalidRow with the reason.

    Surrounding white space is stripped and an internationalized domain is
    converted to its ASCII (IDNA) form. A non-ASCII local part is rejected,
    because delivering it needs SMTPUTF8, which poller does not use.
    """
    if raw is None:
        raise InvalidRow("email is NULL")
    if not isinstance(raw, str):
        raise InvalidRow(f"email is not text ({type(raw).__name__})")
    address = raw.strip()
    if not address:
        raise InvalidRow("email is empty")
    if any(unicodedata.category(char)[0] in "CZ" for char in address):
        raise InvalidRow("email contains white space or control characters")
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        raise InvalidRow("email must have a local part, one '@' and a domain")
    if not local.isascii():
        raise InvalidRow("email has a non-ASCII local part, which needs SMTPUTF8")
    if not _LOCAL_PART.match(local) or len(local) > 64:
        raise InvalidRow("email has an invalid local part")

    try:
        ascii_domain = domain.encode("idna").decode("ascii") if not domain.isascii() else domain
    except UnicodeError:
        raise InvalidRow("email has an invalid internationalized domain") from None
    labels = ascii_domain.rstrip(".").split(".")
    if len(labels) < 2 or not all(_DOMAIN_LABEL.match(label) for label in labels):
        raise InvalidRow("email has an invalid domain")

    normalized = f"{local}@{ascii_domain.rstrip('.')}"
    if len(normalized) > MAX_ADDRESS_LENGTH:
        raise InvalidRow(f"email is longer than {MAX_ADDRESS_LENGTH} characters")
    return normalized


def parse_points(raw: Any) -> Decimal:
    """Return the points as a number, or raise InvalidRow if they are not one."""
    if raw is None:
        raise InvalidRow("points is NULL")
    if isinstance(raw, bool):
        return Decimal(int(raw))
    if isinstance(raw, (int, Decimal)):
        return Decimal(raw)
    if isinstance(raw, float):
        number = Decimal(repr(raw))
    elif isinstance(raw, (str, bytes)):
        text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else raw
        try:
            number = Decimal(text.strip())
        except InvalidOperation:
            raise InvalidRow(f"points {text[:40]!r} is not a number") from None
    else:
        raise InvalidRow(f"points has the unsupported type {type(raw).__name__}")
    if not number.is_finite():
        raise InvalidRow(f"points {raw!r} is not a finite number")
    return number


def clean_name(raw: Any) -> str:
    """Return the name on one line: control characters (CR, LF, tab and the rest) become spaces."""
    if raw is None:
        return ""
    text = raw if isinstance(raw, str) else str(raw)
    text = "".join(" " if unicodedata.category(char)[0] == "C" else char for char in text)
    text = " ".join(text.split())
    if len(text) > MAX_NAME_LENGTH:
        text = text[: MAX_NAME_LENGTH - 1].rstrip() + "…"
    return text


def format_points(points: Decimal) -> str:
    """Render 150, 150.5 or 1E+3 as 150, 150.5 and 1000."""
    if points == points.to_integral_value():
        return f"{points.to_integral_value():f}"
    return f"{points.normalize():f}"


@dataclasses.dataclass(frozen=True)
class Recipient:
    """A validated user, ready for a message."""

    user_id: str
    email: str
    name: str
    points: Decimal


def template_fields(recipient: Recipient, rule: Rule) -> dict[str, str]:
    # The greeting falls back to the address when the user has no name.
    return {
        "name": recipient.name or recipient.email,
        "email": recipient.email,
        "points": format_points(recipient.points),
        "threshold": format_points(rule.threshold),
    }


def new_message_id(sender: str) -> str:
    """Create a Message-ID in the sender's domain; it is stored with the claim."""
    domain = sender_domain(sender)
    return make_msgid(idstring="poller", domain=domain)


def sender_domain(sender: str) -> str:
    addresses = getaddresses([sender])
    address = addresses[0][1] if addresses else ""
    domain = address.rpartition("@")[2]
    return domain or "localhost"


def build_message(
    recipient: Recipient,
    rule: Rule,
    *,
    sender: str,
    message_id: str,
    now: datetime | None = None,
) -> EmailMessage:
    """Render the rule's templates for one recipient.

    Templates are string.Template, so they can reach only the four fields and
    nothing of Python. The name is one line already, so no field can add a
    header or a recipient.
    """
    fields = template_fields(recipient, rule)
    subject = " ".join(string.Template(rule.subject).substitute(fields).split())
    body = string.Template(rule.body).substitute(fields)

    message = EmailMessage(policy=MESSAGE_POLICY)
    message["From"] = sender
    message["To"] = Address(display_name=recipient.name, addr_spec=recipient.email)
    message["Subject"] = subject
    message["Date"] = format_datetime(now or datetime.now(timezone.utc))
    message["Message-ID"] = message_id
    message["Auto-Submitted"] = "auto-generated"
    message.set_content(body, charset="utf-8")

    if rule.html_body is not None:
        from html import escape

        html_fields = {key: escape(value) for key, value in fields.items()}
        message.add_alternative(
            string.Template(rule.html_body).substitute(html_fields), subtype="html", charset="utf-8"
        )
    return message
