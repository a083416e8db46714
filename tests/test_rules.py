"""Several notification rules from the config file, and the HTML part."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.conftest import SMTPServer, create_users, notifications, upgrade

RULES = """
[[rules]]
name = "bronze"
threshold = 100
subject = "Bronze for $name"

[[rules]]
name = "silver"
threshold = 500
subject = "Silver for $name"

[[rules]]
name = "gold"
threshold = 1000
subject = "Gold for $name"
"""


def write_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "poller.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def run_args(database_url: str, smtp: SMTPServer, config: str, *extra: str) -> list[str]:
    return ["run", "--config", config, "--database-url", database_url, "--mail-url", smtp.url, *extra]


def test_run_handles_every_rule_in_one_pass(invoke: Any, app_db: str, smtp_server: SMTPServer, tmp_path: Path) -> None:
    config = write_config(tmp_path, RULES)

    first = invoke(*run_args(app_db, smtp_server, config, "--json"))
    second = invoke(*run_args(app_db, smtp_server, config, "--json"))

    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["sent"] == 5
    assert json.loads(second.stdout)["sent"] == 0
    subjects = sorted(str(item.message["Subject"]) for item in smtp_server.sink.received)
    assert subjects == ["Bronze for Ada", "Bronze for Cy", "Bronze for Dee", "Gold for Dee", "Silver for Dee"]
    recorded = sorted((row["rule"], row["user_id"]) for row in notifications(app_db))
    assert recorded == [("bronze", "1"), ("bronze", "3"), ("bronze", "4"), ("gold", "4"), ("silver", "4")]


def test_rule_option_limits_run_to_one_rule(invoke: Any, app_db: str, smtp_server: SMTPServer, tmp_path: Path) -> None:
    config = write_config(tmp_path, RULES)

    result = invoke(*run_args(app_db, smtp_server, config, "--rule", "gold"))

    assert result.exit_code == 0, result.output
    assert smtp_server.sink.recipients() == ["dee@example.com"]
    assert [row["rule"] for row in notifications(app_db)] == ["gold"]


def test_unknown_rule_is_usage_error(invoke: Any, app_db: str, smtp_server: SMTPServer, tmp_path: Path) -> None:
    config = write_config(tmp_path, RULES)

    result = invoke(*run_args(app_db, smtp_server, config, "--rule", "platinum"))

    assert result.exit_code == 2
    assert "Configured rules: bronze, silver, gold" in result.stderr


def test_pending_lists_each_rule(invoke: Any, app_db: str, tmp_path: Path) -> None:
    config = write_config(tmp_path, RULES)

    result = invoke("pending", "--config", config, "--database-url", app_db, "--json")

    pairs = [(item["rule"], item["user_id"]) for item in json.loads(result.stdout)]
    assert pairs == [("bronze", "1"), ("bronze", "3"), ("bronze", "4"), ("silver", "4"), ("gold", "4")]


def test_default_is_single_100_point_rule(invoke: Any, app_db: str, smtp_server: SMTPServer) -> None:
    result = invoke("run", "--database-url", app_db, "--mail-url", smtp_server.url)

    assert result.exit_code == 0, result.output
    assert {row["rule"] for row in notifications(app_db)} == {"points-100"}
    assert len(smtp_server.sink.received) == 3


def test_rule_without_threshold_is_rejected(invoke: Any, app_db: str, tmp_path: Path) -> None:
    config = write_config(tmp_path, '[[rules]]\nname = "bronze"\n')

    result = invoke("pending", "--config", config, "--database-url", app_db)

    assert result.exit_code == 2
    assert "Rule 'bronze'" in result.stderr
    assert "has no threshold" in result.stderr


def test_html_part_beside_plain_text(invoke: Any, database_url: str, smtp_server: SMTPServer, tmp_path: Path) -> None:
    create_users(database_url, [{"id": 1, "email": "tom@example.com", "points": 700, "name": "Tom & <Jerry>"}])
    upgrade(database_url)
    html = tmp_path / "silver.html"
    html.write_text("<p>Well done, <b>$name</b>: $points points.</p>\n", encoding="utf-8")
    config = write_config(
        tmp_path, f'[[rules]]\nname = "silver"\nthreshold = 500\nhtml_body_file = "{html}"\nbody = "Hi $name"\n'
    )

    result = invoke(*run_args(database_url, smtp_server, config))

    assert result.exit_code == 0, result.output
    message = smtp_server.sink.received[0].message
    assert message.get_content_type() == "multipart/alternative"
    plain = message.get_body(("plain",))
    rich = message.get_body(("html",))
    assert plain is not None
    assert rich is not None
    assert plain.get_content().strip() == "Hi Tom & <Jerry>"
    assert "<b>Tom &amp; &lt;Jerry&gt;</b>: 700 points." in rich.get_content()


def test_html_body_file_option_for_default_rule(
    invoke: Any, app_db: str, smtp_server: SMTPServer, tmp_path: Path
) -> None:
    html = tmp_path / "body.html"
    html.write_text("<p>$threshold reached</p>", encoding="utf-8")

    result = invoke("run", "--database-url", app_db, "--mail-url", smtp_server.url, "--html-body-file", str(html))

    assert result.exit_code == 0, result.output
    rich = smtp_server.sink.received[0].message.get_body(("html",))
    assert rich is not None
    assert "<p>100 reached</p>" in rich.get_content()


def test_plain_only_without_html_template(invoke: Any, app_db: str, smtp_server: SMTPServer) -> None:
    invoke("run", "--database-url", app_db, "--mail-url", smtp_server.url)

    assert smtp_server.sink.received[0].message.get_content_type() == "text/plain"
