"""Effective settings: command-line option, environment, config file, default.

Every setting is declared once in SETTINGS; the CLI builds its options from
that table, `poller config show` lists it, and docs/configuration.md is
checked against it. This module imports neither SQLAlchemy nor Alembic, so
that `poller --help` and `poller cron show` start quickly.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import socket
import string
import sys
from collections.abc import Callable, Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from poller.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

ENV_PREFIX = "POLLER_"
CONFIG_ENV = "POLLER_CONFIG"
TEMPLATE_FIELDS = ("name", "email", "points", "threshold")

DEFAULT_SUBJECT = "Congratulations, you reached $threshold points!"
DEFAULT_BODY = """\
Hello $name,

congratulations: you now have $points points, which takes you past the
$threshold-point mark.

Thank you for playing!
"""


@dataclasses.dataclass(frozen=True)
class Setting:
    """One configurable value and every name it goes by."""

    name: str
    default: Any
    help: str
    parse: Callable[[str, Any], Any]
    option: str | None = None  # None: not settable on the command line
    secret: bool = False
    metavar: str | None = None  # None: the parser's, from PARSER_METAVARS

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flag(self) -> str | None:
        if self.option is None:
            return None
        return self.option

    @property
    def value_name(self) -> str:
        """Return the placeholder that --help shows for the option's value, such as SECONDS."""
        return self.metavar or PARSER_METAVARS.get(self.parse, "TEXT")


class _Invalid(ValueError):
    """A parser's reason; the caller adds where the value came from."""


def _text(_name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"expected a string, got {value!r}")
    return value


def _optional_text(name: str, value: Any) -> str | None:
    text = _text(name, value).strip()
    return text or None


def _identifier(name: str, value: Any) -> str:
    text = _text(name, value).strip()
    if not text:
        raise _Invalid("must not be empty")
    return text


def _optional_identifier(name: str, value: Any) -> str | None:
    # An empty name column means "this table has no name column".
    return _text(name, value).strip() or None


# The largest threshold poller accepts. The threshold is bound into SQL as an
# integer or a float: drivers reject integers beyond 64 bits (SQLite raises
# OverflowError), and below 2**53 a float represents every whole number exactly.
MAX_THRESHOLD = Decimal(10**15)
THRESHOLD_RANGE = f"a number greater than 0 and at most {MAX_THRESHOLD:f}"


def _number(_name: str, value: Any) -> Decimal:
    if isinstance(value, bool):
        raise _Invalid(f"{value!r} is not a number")
    try:
        number = Decimal(str(value).strip())
    except InvalidOperation:
        raise _Invalid(f"{value!r} is not a number") from None
    if not number.is_finite():
        raise _Invalid(f"{value!r} is not a finite number")
    return number


def _threshold(name: str, value: Any) -> Decimal:
    number = _number(name, value)
    if not 0 < number <= MAX_THRESHOLD:
        raise _Invalid(f"the threshold must be {THRESHOLD_RANGE}")
    return number


def _positive_int(_name: str, value: Any) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        raise _Invalid(f"{value!r} is not a whole number") from None
    if number < 1:
        raise _Invalid(f"{value!r} must be 1 or more")
    return number


def _seconds(_name: str, value: Any) -> float:
    try:
        number = float(str(value).strip())
    except ValueError:
        raise _Invalid(f"{value!r} is not a number of seconds") from None
    if not math.isfinite(number) or number <= 0:
        raise _Invalid(f"{value!r} must be a positive number of seconds")
    return number


def _template(_name: str, value: Any) -> str:
    text = _text(_name, value)
    check_template(text)
    return text


def _existing_file(_name: str, value: Any) -> Path | None:
    text = _text(_name, value).strip()
    if not text:
        return None
    path = Path(text).expanduser()
    if not path.is_file():
        raise _Invalid(f"file {text!r} does not exist")
    return path.resolve()


def _path(_name: str, value: Any) -> Path | None:
    text = _text(_name, value).strip()
    return Path(text).expanduser().resolve() if text else None


def _url(_name: str, value: Any) -> str | None:
    text = _text(_name, value).strip()
    if not text:
        return None
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _Invalid("must be an http:// or https:// URL with a host")
    return text


def _mail_url(_name: str, value: Any) -> str:
    text = _text(_name, value).strip()
    parse_mail_url(text)
    return text


PARSER_METAVARS: dict[Callable[[str, Any], Any], str] = {
    _threshold: "NUMBER",
    _positive_int: "INTEGER",
    _seconds: "SECONDS",
    _existing_file: "PATH",
    _path: "PATH",
    _url: "URL",
    _mail_url: "URL",
    _template: "TEMPLATE",
}


def default_mail_from() -> str:
    # gethostname() does no DNS lookup, unlike getfqdn(), so it cannot hang.
    return f"poller@{socket.gethostname()}"


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "database_url",
        "sqlite:///poller.db",
        "SQLAlchemy URL of the database that holds the users table.",
        _identifier,
        "--database-url",
        metavar="URL",
    ),
    Setting(
        "mail_url",
        "smtp://localhost:25",
        "Mail backend: smtp://, smtp+starttls://, smtps://HOST[:PORT], sendmail:[PATH], console: or mbox:PATH.",
        _mail_url,
        "--mail-url",
    ),
    Setting(
        "mail_from",
        None,
        "From address, optionally with a display name. Default: poller@ and this host's name.",
        _optional_text,
        "--from",
        metavar="ADDRESS",
    ),
    Setting(
        "smtp_password",
        None,
        "SMTP password. Environment or config file only, so that it never shows in `ps`.",
        _optional_text,
        None,
        secret=True,
    ),
    Setting(
        "smtp_password_file",
        None,
        "File whose first line is the SMTP password.",
        _existing_file,
        "--smtp-password-file",
    ),
    Setting("smtp_timeout", 30.0, "Seconds to wait for the SMTP server on each step.", _seconds, "--smtp-timeout"),
    Setting(
        "smtp_ca_file",
        None,
        "PEM file of CA certificates that sign the mail server's certificate.",
        _existing_file,
        "--smtp-ca-file",
    ),
    Setting(
        "smtp_connections", 1, "SMTP connections used in parallel by one run.", _positive_int, "--smtp-connections"
    ),
    Setting("threshold", Decimal(100), "Points a user must reach to be notified.", _threshold, "--threshold"),
    Setting(
        "users_table",
        "users",
        "Table or view that holds the users. Poller only reads it.",
        _identifier,
        "--users-table",
        metavar="TABLE",
    ),
    Setting("id_column", "id", "Column with each user's unique id.", _identifier, "--id-column", metavar="COLUMN"),
    Setting(
        "email_column",
        "email",
        "Column with each user's email address.",
        _identifier,
        "--email-column",
        metavar="COLUMN",
    ),
    Setting(
        "points_column", "points", "Column with each user's points.", _identifier, "--points-column", metavar="COLUMN"
    ),
    Setting(
        "name_column",
        "name",
        "Column with each user's display name; empty for none.",
        _optional_identifier,
        "--name-column",
        metavar="COLUMN",
    ),
    Setting(
        "subject",
        DEFAULT_SUBJECT,
        "Subject template; $name, $email, $points and $threshold are replaced.",
        _template,
        "--subject",
    ),
    Setting("body", DEFAULT_BODY, "Plain-text body template, with the same fields as --subject.", _template, "--body"),
    Setting(
        "body_file", None, "File with the plain-text body template; overrides --body.", _existing_file, "--body-file"
    ),
    Setting(
        "html_body_file",
        None,
        "File with an HTML body template, sent beside the plain text.",
        _existing_file,
        "--html-body-file",
    ),
    Setting("lease", 600.0, "Seconds after which a claim left by a crashed run is retried.", _seconds, "--lease"),
    Setting(
        "max_attempts",
        5,
        "Delivery attempts after transient errors before a notification is marked failed.",
        _positive_int,
        "--max-attempts",
    ),
    Setting(
        "retry_backoff",
        300.0,
        "Seconds to wait before the first retry; doubled after each further attempt.",
        _seconds,
        "--retry-backoff",
    ),
    Setting("batch_size", 200, "Users claimed per database transaction.", _positive_int, "--batch-size"),
    Setting(
        "lock_file",
        None,
        "Lock file that keeps runs on this host from overlapping. "
        "Default: one per database under /run/lock, else /var/lock, else $XDG_RUNTIME_DIR.",
        _path,
        "--lock-file",
    ),
    Setting(
        "ping_url",
        None,
        "Heartbeat URL (healthchecks.io protocol) told when a run starts and ends.",
        _url,
        "--ping-url",
    ),
)

SETTINGS_BY_NAME = {setting.name: setting for setting in SETTINGS}


@dataclasses.dataclass(frozen=True)
class Rule:
    """A notification rule: who is due (points >= threshold) and what they get."""

    name: str
    threshold: Decimal
    subject: str
    body: str
    html_body: str | None = None


@dataclasses.dataclass(frozen=True)
class MailURL:
    """A parsed --mail-url."""

    scheme: str  # smtp, smtp+starttls, smtps, sendmail, console, mbox
    host: str = ""
    port: int = 0
    username: str | None = None
    path: str = ""

    @property
    def is_smtp(self) -> bool:
        return self.scheme in ("smtp", "smtp+starttls", "smtps")


SMTP_DEFAULT_PORTS = {"smtp": 25, "smtp+starttls": 587, "smtps": 465}


def parse_mail_url(text: str) -> MailURL:
    """Parse a mail URL, raising ConfigError with the accepted forms."""
    forms = (
        "smtp://HOST[:PORT], smtp+starttls://HOST[:PORT], smtps://HOST[:PORT], sendmail:[PATH], console: or mbox:PATH"
    )
    scheme, _, rest = text.partition(":")
    scheme = scheme.lower()

    if scheme in SMTP_DEFAULT_PORTS:
        parts = urlsplit(text)
        if not parts.hostname:
            raise ConfigError(f"--mail-url {redact_url(text)!r} has no host. Use one of: {forms}.")
        if parts.password is not None:
            raise ConfigError(
                "--mail-url must not contain a password. Put it in POLLER_SMTP_PASSWORD or "
                "POLLER_SMTP_PASSWORD_FILE, or in the config file."
            )
        try:
            port = parts.port or SMTP_DEFAULT_PORTS[scheme]
        except ValueError:
            raise ConfigError(f"--mail-url {text!r} has an invalid port. Use a number from 1 to 65535.") from None
        username = unquote(parts.username) if parts.username else None
        return MailURL(scheme, parts.hostname, port, username)

    if scheme == "sendmail":
        return MailURL(scheme, path=(rest.lstrip("/") and "/" + rest.lstrip("/")) or "/usr/sbin/sendmail")
    if scheme == "console":
        return MailURL(scheme)
    if scheme == "mbox":
        path = rest[2:] if rest.startswith("//") else rest
        if not path:
            raise ConfigError("--mail-url 'mbox:' needs a file path, for example mbox:/var/mail/poller.mbox.")
        return MailURL(scheme, path=str(Path(path).expanduser().resolve()))
    raise ConfigError(f"--mail-url {redact_url(text)!r} is not supported. Use one of: {forms}.")


def redact_url(url: str) -> str:
    """Return the URL with any password replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")
    user = parts.username or ""
    return url.replace(parts.netloc, f"{user}:***@{netloc[2]}", 1)


def redact_path_url(url: str) -> str:
    """Return the URL's scheme and host with the path hidden, for URLs whose path is a secret token."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        port = parts.port
    except ValueError:  # an invalid port is shown as no port
        port = None
    if port is not None:
        host = f"{host}:{port}"
    return f"{parts.scheme}://{host}/***"


def check_template(text: str) -> None:
    """Raise _Invalid unless every $placeholder is one of TEMPLATE_FIELDS."""
    for match in string.Template.pattern.finditer(text):
        if match.group("invalid") is not None:
            offset = match.start("invalid")
            raise _Invalid(f"has a stray '$' at character {offset}; write $$ for a literal dollar sign")
        field = match.group("named") or match.group("braced")
        if field is not None and field not in TEMPLATE_FIELDS:
            allowed = ", ".join("$" + name for name in TEMPLATE_FIELDS)
            raise _Invalid(f"uses ${field}, which is not a field; use {allowed}")


@dataclasses.dataclass
class Settings:
    """The effective settings and where each came from."""

    values: dict[str, Any]
    sources: dict[str, str]
    rules: tuple[Rule, ...]
    config_path: Path | None = None

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def mail(self) -> MailURL:
        return parse_mail_url(self.values["mail_url"])

    @property
    def sender(self) -> str:
        return self.values["mail_from"] or default_mail_from()

    def password(self) -> str | None:
        """Return the SMTP password from POLLER_SMTP_PASSWORD or the password file."""
        if self.values["smtp_password"]:
            return str(self.values["smtp_password"])
        path = self.values["smtp_password_file"]
        if path is None:
            return None
        try:
            return Path(path).read_text(encoding="utf-8").splitlines()[0] if Path(path).stat().st_size else ""
        except OSError as exc:
            raise ConfigError(f"Cannot read --smtp-password-file {str(path)!r}: {exc.strerror}.") from None

    def display(self, name: str) -> str:
        """Render a value for output, with secrets hidden."""
        value = self.values[name]
        if value is None:
            return ""
        if SETTINGS_BY_NAME[name].secret:
            return "***"
        if name == "database_url":
            return redact_url(str(value))
        if name == "ping_url":
            return redact_path_url(str(value))
        return str(value)


def _where(setting: Setting, source: str, config_path: Path | None) -> str:
    if source == "option":
        return f"option {setting.flag}"
    if source == "environment":
        return f"environment variable {setting.env}"
    return f"key {setting.name!r} in config file {str(config_path)!r}"


def read_config_file(path: Path) -> dict[str, Any]:
    """Read a TOML config file, raising ConfigError that names the file."""
    try:
        with path.open("rb") as handle:
            data: dict[str, Any] = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"Config file {str(path)!r} not found. Check --config or {CONFIG_ENV}.") from None
    except OSError as exc:
        raise ConfigError(f"Cannot read config file {str(path)!r}: {exc.strerror}.") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"Config file {str(path)!r} is not valid TOML: {exc}.") from None

    known = [*SETTINGS_BY_NAME, "rules"]
    unknown = sorted(set(data) - set(known))
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, known, n=1)
        hint = f"Did you mean {close[0]!r}? " if close else ""
        raise ConfigError(
            f"Config file {str(path)!r} has unknown key {key!r}. {hint}"
            "The valid keys are [[rules]] and the SETTING names that `poller config show` prints; "
            "docs/configuration.md describes each."
        )
    return data


def load_settings(
    options: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
    config_path: str | Path | None = None,
) -> Settings:
    """Merge option, environment, config file and default for every setting.

    `options` maps setting names to command-line values, None when not
    given. Raises ConfigError naming the option, variable or key at fault.
    """
    environ = os.environ if environ is None else environ
    if config_path is None and environ.get(CONFIG_ENV):
        config_path = environ[CONFIG_ENV]
    path = Path(config_path).expanduser().resolve() if config_path else None
    file_values = read_config_file(path) if path else {}

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for setting in SETTINGS:
        raw: Any
        if options.get(setting.name) is not None:
            raw, source = options[setting.name], "option"
        elif environ.get(setting.env, "") != "":
            raw, source = environ[setting.env], "environment"
        elif setting.name in file_values:
            raw, source = file_values[setting.name], "file"
        else:
            values[setting.name] = setting.default
            sources[setting.name] = "default"
            continue

        try:
            values[setting.name] = setting.parse(setting.name, raw)
        except _Invalid as exc:
            shown = "***" if setting.secret else raw
            if setting.name == "ping_url" and isinstance(raw, str):
                shown = redact_path_url(raw)  # the check's URL works as a password
            where = _where(setting, source, path)
            raise ConfigError(f"Invalid value {shown!r} for {where}: {exc}.") from None
        except ConfigError as exc:
            raise ConfigError(f"{exc} (from {_where(setting, source, path)})") from None
        sources[setting.name] = source

    if values["body_file"] is not None:
        values["body"] = _read_template(values["body_file"], "--body-file")
    html_body = _read_template(values["html_body_file"], "--html-body-file") if values["html_body_file"] else None

    rules = _load_rules(file_values.get("rules"), values, html_body, path)
    return Settings(values, sources, rules, path)


def _read_template(path: Path, option: str) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"Cannot read {option} {str(path)!r}: {exc}. Save it as UTF-8 text.") from None
    try:
        check_template(text)
    except _Invalid as exc:
        raise ConfigError(f"Template {option} {str(path)!r} {exc}.") from None
    return text


def default_rule_name(threshold: Decimal) -> str:
    """Name the rule after its threshold, so that a new threshold is a new rule."""
    return f"points-{threshold.normalize():f}"


def _load_rules(raw_rules: Any, values: dict[str, Any], html_body: str | None, path: Path | None) -> tuple[Rule, ...]:
    if raw_rules is None:
        rule = Rule(
            default_rule_name(values["threshold"]), values["threshold"], values["subject"], values["body"], html_body
        )
        return (rule,)

    where = f"config file {str(path)!r}"
    if not isinstance(raw_rules, list) or not raw_rules:
        raise ConfigError(f"'rules' in {where} must be a non-empty array of tables: [[rules]] with name and threshold.")

    rules: list[Rule] = []
    for index, raw in enumerate(raw_rules, start=1):
        if not isinstance(raw, dict):
            raise ConfigError(f"Rule {index} in {where} must be a table with name and threshold.")
        unknown = sorted(set(raw) - {"name", "threshold", "subject", "body", "body_file", "html_body_file"})
        if unknown:
            raise ConfigError(f"Rule {index} in {where} has unknown key {unknown[0]!r}.")
        try:
            name = _identifier("name", raw.get("name", ""))
            subject = _template("subject", raw.get("subject", values["subject"]))
            body = _template("body", raw.get("body", values["body"]))
        except _Invalid as exc:
            raise ConfigError(f"Rule {index} in {where}: {exc}.") from None
        if "threshold" not in raw:
            raise ConfigError(f"Rule {name!r} in {where} has no threshold. Add threshold = 100 (or another number).")
        try:
            threshold = _threshold("threshold", raw["threshold"])
        except _Invalid as exc:
            raise ConfigError(f"Invalid threshold {raw['threshold']!r} in rule {name!r} in {where}: {exc}.") from None
        if len(name) > 100:
            raise ConfigError(f"Rule name {name[:20]!r}... in {where} is longer than 100 characters.")
        if any(rule.name == name for rule in rules):
            raise ConfigError(f"Rule name {name!r} appears twice in {where}. Give each rule its own name.")

        rule_html = html_body
        for key in ("body_file", "html_body_file"):
            if key in raw:
                try:
                    file_path = _existing_file(key, raw[key])
                except _Invalid as exc:
                    raise ConfigError(f"Rule {name!r} in {where}: {key} {exc}.") from None
                if file_path is None:
                    continue
                text = _read_template(file_path, f"{key} of rule {name!r}")
                if key == "body_file":
                    body = text
                else:
                    rule_html = text
        rules.append(Rule(name, threshold, subject, body, rule_html))
    return tuple(rules)


def select_rules(settings: Settings, rule_name: str | None) -> tuple[Rule, ...]:
    """Return all rules, or only the one --rule names."""
    if rule_name is None:
        return settings.rules
    for rule in settings.rules:
        if rule.name == rule_name:
            return (rule,)
    names = ", ".join(rule.name for rule in settings.rules)
    raise ConfigError(f"--rule {rule_name!r} is not a configured rule. Configured rules: {names}.")
