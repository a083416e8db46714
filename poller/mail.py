"""Mail backends: SMTP (plain, STARTTLS, implicit TLS), sendmail, console and mbox.

A backend's send() returns an Outcome for one recipient. It raises
MailConfigError or MailError only when the backend cannot deliver anything,
so that the run stops instead of marking every user failed.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import smtplib
import ssl
import subprocess
import threading
from collections.abc import Callable
from email import policy
from email.message import EmailMessage
from email.utils import getaddresses
from typing import IO, TYPE_CHECKING, Protocol

from poller.errors import ConfigError, MailConfigError, MailError, MailStalled
from poller.settings import MailURL, Settings

if TYPE_CHECKING:
    import mailbox

log = logging.getLogger(__name__)

# How many times in a row one connection may be re-established before the
# run gives up on the server.
MAX_RECONNECTS = 3

# How many messages in a row may go unconfirmed after DATA (a timeout
# waiting for the server's reply) before the run stops: each one costs a
# full --smtp-timeout.
MAX_DATA_TIMEOUTS = 2


class Status(enum.Enum):
    ACCEPTED = "accepted"
    PERMANENT = "permanent"  # 5xx: record as failed, never retry
    TRANSIENT = "transient"  # 4xx, timeouts, drops: a later run retries


@dataclasses.dataclass(frozen=True)
class Outcome:
    status: Status
    reply: str = ""  # the server's reply, for last_error


ACCEPTED = Outcome(Status.ACCEPTED)


def classify(code: int, reply: bytes | str) -> Outcome:
    """Map an SMTP reply code to an outcome: 5xx permanent, anything else not accepted is transient."""
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply
    text = f"{code} {' '.join(text.split())}".strip()
    if 500 <= code <= 599:
        return Outcome(Status.PERMANENT, text)
    return Outcome(Status.TRANSIENT, text)


class Backend(Protocol):
    def send(self, message: EmailMessage, sender: str, recipient: str) -> Outcome: ...

    def check(self) -> str:
        """Connect and greet without sending; return a one-line description."""
        ...

    def close(self) -> None: ...


def envelope_sender(sender: str) -> str:
    """Return the bare address of a From value such as 'Game <noreply@example.com>'."""
    addresses = getaddresses([sender])
    address = addresses[0][1] if addresses else ""
    if "@" not in address or any(char in address for char in "\r\n"):
        raise ConfigError(
            f"--from {sender!r} is not an email address. Use a form such as 'Game <noreply@example.com>'."
        )
    return address


def _is_timeout(exc: BaseException) -> bool:
    # smtplib turns a read that timed out into SMTPServerDisconnected.
    return isinstance(exc, TimeoutError) or isinstance(exc.__context__, TimeoutError)


class _Reconnect(Exception):
    """The connection dropped before the message's data was sent, so resending is safe."""


class SMTPBackend:
    """One reused SMTP connection, re-established when the server drops it."""

    def __init__(self, url: MailURL, *, password: str | None, timeout: float, ca_file: str | None = None) -> None:
        if url.username and password is None:
            raise ConfigError(
                f"--mail-url names the user {url.username!r} but no password is set. "
                "Set POLLER_SMTP_PASSWORD or POLLER_SMTP_PASSWORD_FILE."
            )
        self.url = url
        self.password = password
        self.timeout = timeout
        self.ca_file = ca_file
        self.smtp: smtplib.SMTP | None = None
        self.gave_up_on_previous = False  # the last message ran out of reconnects
        self.data_timeouts = 0  # consecutive messages whose DATA reply timed out
        self.where = f"{url.host}:{url.port}"

    def _tls_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca_file)

    def connect(self) -> smtplib.SMTP:
        """Open, greet, upgrade to TLS and log in; raise MailError or MailConfigError."""
        scheme = self.url.scheme
        smtp: smtplib.SMTP | None = None
        try:
            if scheme == "smtps":
                smtp = smtplib.SMTP_SSL(self.url.host, self.url.port, timeout=self.timeout, context=self._tls_context())
            else:
                smtp = smtplib.SMTP(self.url.host, self.url.port, timeout=self.timeout)
            smtp.ehlo()
            if scheme == "smtp+starttls":
                if not smtp.has_extn("starttls"):
                    raise MailConfigError(
                        f"The mail server at {self.where} does not offer STARTTLS, which smtp+starttls:// requires. "
                        "Change --mail-url to smtps:// if it expects implicit TLS, or to smtp:// to send unencrypted."
                    )
                smtp.starttls(context=self._tls_context())
                smtp.ehlo()
            if self.url.username:
                smtp.login(self.url.username, self.password or "")
        except MailError:
            _close_quietly(smtp)
            raise
        except ssl.SSLCertVerificationError as exc:
            _close_quietly(smtp)
            raise MailConfigError(
                f"The mail server at {self.where} presented a certificate that failed verification "
                f"({exc.verify_message}). Set --smtp-ca-file to the CA that signed it, or fix the host name in --mail-url."
            ) from None
        except ssl.SSLError as exc:
            _close_quietly(smtp)
            hint = (
                "If the server expects STARTTLS (usually port 587 or 25), use smtp+starttls://."
                if scheme == "smtps"
                else "Check that the server supports TLS on this port."
            )
            raise MailConfigError(
                f"TLS with the mail server at {self.where} failed ({exc.reason or exc}). {hint}"
            ) from None
        except smtplib.SMTPAuthenticationError as exc:
            _close_quietly(smtp)
            reply = classify(exc.smtp_code, exc.smtp_error).reply
            raise MailConfigError(
                f"The mail server at {self.where} rejected the credentials for user {self.url.username!r}: {reply}. "
                "Check the user in --mail-url and POLLER_SMTP_PASSWORD or POLLER_SMTP_PASSWORD_FILE."
            ) from None
        except smtplib.SMTPNotSupportedError:
            _close_quietly(smtp)
            raise MailConfigError(
                f"The mail server at {self.where} does not accept logins (no AUTH). Remove the user name from --mail-url, "
                "or use smtp+starttls:// if it offers AUTH only after STARTTLS."
            ) from None
        except TimeoutError:
            _close_quietly(smtp)
            raise MailError(self._timeout_message()) from None
        except smtplib.SMTPConnectError as exc:
            _close_quietly(smtp)
            raise MailError(
                f"The mail server at {self.where} refused the session: {classify(exc.smtp_code, exc.smtp_error).reply}."
            ) from None
        except smtplib.SMTPServerDisconnected as exc:
            _close_quietly(smtp)
            if isinstance(exc.__context__, TimeoutError):
                # smtplib reports a read that timed out as a disconnect.
                raise MailError(self._timeout_message()) from None
            raise MailError(
                f"The mail server at {self.where} closed the connection during setup ({exc}). Check --mail-url."
            ) from None
        except smtplib.SMTPResponseException as exc:
            _close_quietly(smtp)
            raise MailError(
                f"The mail server at {self.where} failed the setup: {classify(exc.smtp_code, exc.smtp_error).reply}."
            ) from None
        except OSError as exc:
            _close_quietly(smtp)
            raise MailError(
                f"Cannot connect to the mail server at {self.where}: {exc.strerror or exc}. Check --mail-url."
            ) from None

        log.debug("Connected to %s (%s)", self.where, scheme)
        self.smtp = smtp
        return smtp

    def _timeout_message(self) -> str:
        hint = " If this port expects implicit TLS (usually 465), use smtps://." if self.url.scheme != "smtps" else ""
        return (
            f"Timed out after {self.timeout:g} s waiting for the mail server at {self.where}.{hint} "
            "Check --mail-url and --smtp-timeout."
        )

    def check(self) -> str:
        smtp = self.connect()
        features = ", ".join(sorted(smtp.esmtp_features)) or "none"
        self.close()
        return f"{self.url.scheme}://{self.where} answered EHLO (extensions: {features})"

    def send(self, message: EmailMessage, sender: str, recipient: str) -> Outcome:
        data = message.as_bytes(policy=policy.SMTP)
        reconnects = 0
        while True:
            smtp = self.smtp or self.connect()
            try:
                outcome = self._transaction(smtp, data, sender, recipient)
            except _Reconnect as exc:
                self._drop()
                reconnects += 1
                if reconnects <= MAX_RECONNECTS:
                    log.warning(
                        "Mail server at %s dropped the connection (%s); reconnecting, attempt %d of %d",
                        self.where,
                        exc,
                        reconnects,
                        MAX_RECONNECTS,
                    )
                    continue
                # One message that keeps failing is deferred, so that a fault
                # tied to one recipient does not hold up the others. Two such
                # messages in a row point at the server, so they stop the run.
                if self.gave_up_on_previous:
                    raise MailError(
                        f"The mail server at {self.where} dropped the connection {reconnects} times in a row "
                        f"for two messages in a row ({exc}); stopping the run."
                    ) from None
                self.gave_up_on_previous = True
                return Outcome(Status.TRANSIENT, str(exc))
            self.gave_up_on_previous = False
            return outcome

    def _transaction(self, smtp: smtplib.SMTP, data: bytes, sender: str, recipient: str) -> Outcome:
        # Each step is sent on its own so that a dropped connection before
        # DATA (safe to resend) can be distinguished from one during DATA
        # (the message may have been accepted).
        try:
            code, reply = smtp.mail(sender)
            if code == 421:
                raise _Reconnect(classify(code, reply).reply)
            if code != 250:
                self._reset(smtp)
                return self._sender_refused(code, reply)
            code, reply = smtp.rcpt(recipient)
            if code == 421:
                raise _Reconnect(classify(code, reply).reply)
            if code not in (250, 251):
                self._reset(smtp)
                return classify(code, reply)
        except (smtplib.SMTPServerDisconnected, ConnectionError, TimeoutError) as exc:
            if _is_timeout(exc):
                # A server that stops responding is stalled, not gone, so
                # reconnecting would only wait out the timeout again.
                self._drop()
                raise MailError(
                    f"The mail server at {self.where} did not respond within {self.timeout:g} s before DATA; "
                    "stopping the run. Check the server, or raise --smtp-timeout."
                ) from None
            raise _Reconnect(f"connection dropped before DATA: {exc or type(exc).__name__}") from None

        try:
            code, reply = smtp.data(data)
        except smtplib.SMTPDataError as exc:
            # The server refused DATA itself (no 354); nothing was accepted.
            self._reset(smtp)
            return classify(exc.smtp_code, exc.smtp_error)
        except (smtplib.SMTPServerDisconnected, ConnectionError, TimeoutError) as exc:
            # The server may or may not have accepted the message: a later run
            # resends it with the same Message-ID.
            self._drop()
            if _is_timeout(exc):
                self.data_timeouts += 1
                if self.data_timeouts >= MAX_DATA_TIMEOUTS:
                    raise MailStalled(
                        f"The mail server at {self.where} did not confirm {self.data_timeouts} messages in a row "
                        f"within {self.timeout:g} s after DATA; stopping the run. Check the server, or raise --smtp-timeout.",
                        f"connection lost during DATA: {exc or type(exc).__name__}",
                    ) from None
            return Outcome(Status.TRANSIENT, f"connection lost during DATA: {exc or type(exc).__name__}")
        self.data_timeouts = 0
        if code == 250:
            return ACCEPTED
        if code == 421:
            self._drop()
        return classify(code, reply)

    def _sender_refused(self, code: int, reply: bytes) -> Outcome:
        outcome = classify(code, reply)
        if outcome.status is Status.PERMANENT:
            # A refused sender affects every message, so it is a setup fault.
            raise MailConfigError(
                f"The mail server at {self.where} refused the sender address: {outcome.reply}. Check --from."
            )
        return outcome

    def _reset(self, smtp: smtplib.SMTP) -> None:
        try:
            smtp.rset()
        except (smtplib.SMTPException, OSError):
            self._drop()

    def _drop(self) -> None:
        _close_quietly(self.smtp, quit=False)
        self.smtp = None

    def close(self) -> None:
        # Failing to say QUIT loses nothing: every message was already
        # accepted or refused before this point.
        _close_quietly(self.smtp)
        self.smtp = None


def _close_quietly(smtp: smtplib.SMTP | None, quit: bool = True) -> None:
    if smtp is None:
        return
    try:
        if quit:
            smtp.quit()
    except (smtplib.SMTPException, OSError) as exc:
        log.debug("Ignoring an error while closing the SMTP connection: %s", exc)
    finally:
        smtp.close()


# sendmail's exit codes (sysexits.h) that mean "try again later".
SENDMAIL_TRANSIENT = {69, 71, 74, 75}


class SendmailBackend:
    """Pipe each message to the local MTA's sendmail program."""

    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        self.timeout = timeout

    def check(self) -> str:
        import os

        if not os.access(self.path, os.X_OK):
            raise MailConfigError(
                f"sendmail program {self.path!r} not found or not executable. Set --mail-url sendmail:/path/to/sendmail."
            )
        return f"sendmail program {self.path} is executable"

    def send(self, message: EmailMessage, sender: str, recipient: str) -> Outcome:
        data = message.as_bytes(policy=policy.default)
        try:
            result = subprocess.run(
                [self.path, "-i", "-f", sender, "--", recipient],
                input=data,
                capture_output=True,
                timeout=self.timeout,
                check=False,
            )
        except FileNotFoundError:
            raise MailConfigError(
                f"sendmail program {self.path!r} not found. Set --mail-url sendmail:/path/to/sendmail."
            ) from None
        except PermissionError:
            raise MailConfigError(
                f"sendmail program {self.path!r} is not executable. Set --mail-url sendmail:/path/to/sendmail."
            ) from None
        except subprocess.TimeoutExpired:
            return Outcome(Status.TRANSIENT, f"sendmail did not finish within {self.timeout:g} s")
        if result.returncode == 0:
            return ACCEPTED
        detail = " ".join(result.stderr.decode("utf-8", "replace").split())[:500]
        status = Status.TRANSIENT if result.returncode in SENDMAIL_TRANSIENT else Status.PERMANENT
        return Outcome(status, f"sendmail exited with {result.returncode}: {detail}")

    def close(self) -> None:
        pass


class ConsoleBackend:
    """Write each message to a text stream, for trying poller out."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.lock = threading.Lock()

    def check(self) -> str:
        return "console: messages are printed to standard output"

    def send(self, message: EmailMessage, sender: str, recipient: str) -> Outcome:
        text = message.as_bytes(policy=policy.default).decode("utf-8", "replace")
        with self.lock:
            self.stream.write(text.rstrip("\n") + "\n\n")
            self.stream.flush()
        return ACCEPTED

    def close(self) -> None:
        pass


class MboxBackend:
    """Append each message to an mbox file, locked as mail readers expect."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.box: mailbox.mbox | None = None  # opened on first use

    def _open(self) -> mailbox.mbox:
        # Imported here because it takes about 20 ms and only this backend needs it.
        import mailbox

        if self.box is None:
            try:
                self.box = mailbox.mbox(self.path, create=True)
            except OSError as exc:
                raise MailConfigError(
                    f"Cannot open mbox file {self.path!r}: {exc.strerror}. Check --mail-url mbox:PATH."
                ) from None
        return self.box

    def check(self) -> str:
        self._open()
        self.close()
        return f"mbox file {self.path} can be opened"

    def send(self, message: EmailMessage, sender: str, recipient: str) -> Outcome:
        import mailbox

        with self.lock:
            box = self._open()
            try:
                box.lock()
                try:
                    box.add(message)
                    box.flush()
                finally:
                    box.unlock()
            except (OSError, mailbox.ExternalClashError) as exc:
                raise MailError(f"Cannot write to mbox file {self.path!r}: {exc}.") from None
        return ACCEPTED

    def close(self) -> None:
        if self.box is not None:
            self.box.close()
            self.box = None


BackendFactory = Callable[[], Backend]


def backend_factory(settings: Settings, stdout: IO[str]) -> BackendFactory:
    """Return a function that makes one backend (one connection) per call.

    Settings errors surface here, before anything is claimed.
    """
    url = settings.mail
    if url.is_smtp:
        password = settings.password()
        timeout = settings.smtp_timeout
        ca_file = str(settings.smtp_ca_file) if settings.smtp_ca_file else None
        SMTPBackend(url, password=password, timeout=timeout, ca_file=ca_file)  # validates early
        return lambda: SMTPBackend(url, password=password, timeout=timeout, ca_file=ca_file)
    if url.scheme == "sendmail":
        return lambda: SendmailBackend(url.path, settings.smtp_timeout)
    if url.scheme == "console":
        console = ConsoleBackend(stdout)
        return lambda: console
    mbox = MboxBackend(url.path)
    return lambda: mbox
