"""Configuration: the example file loads, env interpolation, and errors that name the key and the problem."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from sqlalchemy.engine import make_url

from pipeline.config import load_config, parse_config
from pipeline.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "example.yaml"


def _raw() -> dict:
    return yaml.safe_load(EXAMPLE.read_text())


def test_example_config_loads_with_defaults_from_env() -> None:
    cfg = load_config(EXAMPLE, env={})
    assert cfg.kafka.bootstrap_servers == "localhost:9092"
    assert cfg.database.url == "sqlite:///sensorwatch.db"
    group = cfg.groups[0]
    assert group.sensor_names[0] == "speed"
    assert group.period_ms == 10_000
    assert cfg.asset_groups()["pump-2"].name == "pumps"


def test_env_interpolation_replaces_values_and_masks_password() -> None:
    cfg = load_config(EXAMPLE, env={"DATABASE_URL": "postgresql+psycopg://sw:s3cret@db:5432/sw",
                                    "KAFKA_BOOTSTRAP_SERVERS": "k1:9092,k2:9092"})
    assert cfg.kafka.client_kwargs()["bootstrap_servers"] == ["k1:9092", "k2:9092"]
    assert "s3cret" not in cfg.database.safe_url
    assert "s3cret" in cfg.database.url


@pytest.mark.parametrize("password", ["Pa@ssw0rd", "a:b/c%d?e#f", "plain"])
def test_a_password_from_the_environment_is_encoded_where_it_stands_in_the_database_url(password: str) -> None:
    raw = _raw()
    raw["database"]["url"] = "postgresql+psycopg://${PGUSER:-sw}:${PGPASSWORD}@${PGHOST}:5432/sw"
    url = make_url(parse_config(raw, env={"PGPASSWORD": password, "PGHOST": "db.example"}).database.url)
    assert (url.username, url.password, url.host, url.port, url.database) == ("sw", password, "db.example", 5432, "sw")
    whole = "postgresql+psycopg://u:p%40ss@h:5432/d"  # a whole URL from the environment is taken as it is
    raw["database"]["url"] = "${DATABASE_URL}"
    assert parse_config(raw, env={"DATABASE_URL": whole}).database.url == whole


@pytest.mark.parametrize("scheme", ["postgres", "postgresql"])
def test_a_plain_postgres_url_uses_the_installed_driver(scheme: str) -> None:
    raw = _raw()
    raw["database"] = {"url": f"{scheme}://sw:Pa%40ss@db.example:5432/sw"}
    url = make_url(parse_config(raw, env={}).database.url)
    assert (url.drivername, url.password, url.host, url.database) == ("postgresql+psycopg", "Pa@ss", "db.example",
                                                                      "sw")


def test_only_the_password_part_of_the_database_url_is_encoded(caplog: pytest.LogCaptureFixture) -> None:
    raw = _raw()
    raw["database"]["url"] = "postgresql+psycopg://${DB_CREDS}@db/sw"  # the whole user:password part: as it is
    url = make_url(parse_config(raw, env={"DB_CREDS": "sw:secret"}).database.url)
    assert (url.username, url.password) == ("sw", "secret")
    raw["database"]["url"] = "postgresql+psycopg://sw:${PGPASSWORD}@db/sw"
    with caplog.at_level("WARNING", logger="pipeline.config"):
        url = make_url(parse_config(raw, env={"PGPASSWORD": "p%40ss"}).database.url)
    assert url.password == "p%40ss" and "looks percent-encoded" in caplog.text  # encoded again, with a warning
    raw["database"]["url"] = "postgresql+psycopg://sw@db/sw?password=${PGPASSWORD}"
    safe = parse_config(raw, env={"PGPASSWORD": "t0ps3cret"}).database.safe_url
    assert "t0ps3cret" not in safe and safe.startswith("postgresql+psycopg://sw@db/sw?password=")


def test_missing_env_var_without_default_names_the_key() -> None:
    raw = _raw()
    raw["kafka"]["security"] = {"protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "sasl_username": "u",
                                "sasl_password": "${KAFKA_PASSWORD}"}
    with pytest.raises(ConfigError, match=r"kafka\.security\.sasl_password: environment variable KAFKA_PASSWORD is "
                       "not set and has no default"):
        parse_config(raw, env={})
    with pytest.raises(ConfigError, match="KAFKA_PASSWORD is empty and has no default"):  # e.g. a secret not mounted
        parse_config(raw, env={"KAFKA_PASSWORD": ""})


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda r: r["groups"][0]["window"].update(stride=0), r"groups\[0\]\.window\.stride: Input should be greater"),
        (lambda r: r["groups"][0]["window"].update(stride=40), r"groups\[0\]\.window: .*stride must not exceed"),
        (lambda r: r["groups"][0]["model"].update(type="transformer"), r"groups\[0\]\.model\.type"),
        (lambda r: r["groups"][0]["alert"].update(k=5), r"groups\[0\]\.alert: .*k must not exceed n"),
        (lambda r: r["groups"][0]["sensors"][0].update(valid_range=[5, 1]), r"groups\[0\]\.sensors\[0\]\.valid_range"),
        (lambda r: r["kafka"].update(topicc="x"), r"kafka\.topicc: Extra inputs are not permitted"),
        (lambda r: r["groups"].append({**r["groups"][0], "name": "other"}), r"asset 'pump-1' is in groups"),
        (lambda r: r.pop("groups"), r"groups: Field required"),
        (lambda r: r.update(retention={"scores_days": 7}),
         r"retention\.scores_days \(7\) must be more than retrain\.lookback_days \(7\)"),
        (lambda r: r.update(retention={"scores_days": 30, "alerts_days": 10}),
         r"retention: .*alerts_days \(10\) must be at least scores_days \(30\)"),
        (lambda r: r.update(retention={"cron": "61 * * * *"}), r"retention\.cron: .*minute"),
        (lambda r: r.update(retention={"batch_rows": 10}), r"retention\.batch_rows: Input should be greater"),
    ],
)
def test_invalid_config_names_key_path_and_reason(mutate, expected: str) -> None:
    raw = _raw()
    mutate(raw)
    with pytest.raises(ConfigError, match=expected):
        parse_config(raw, env={})


def test_unreadable_and_non_yaml_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("kafka: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_model_hash_changes_with_model_settings_only() -> None:
    a = parse_config(_raw(), env={}).groups[0]
    raw = _raw()
    raw["groups"][0]["alert"]["k"] = 1
    assert parse_config(raw, env={}).groups[0].model_hash() == a.model_hash()
    raw["groups"][0]["window"]["length"] = 20
    assert parse_config(raw, env={}).groups[0].model_hash() != a.model_hash()


def test_an_old_sinks_queue_size_is_accepted_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    base = {"groups": [{"name": "g", "assets": ["a"], "sensors": [{"name": "x"}]}]}
    with caplog.at_level("WARNING", logger="pipeline.config"):
        cfg = parse_config({**base, "sinks": {"webhook": {"url": "https://h.example/x", "queue_size": 1000}}}, env={})
    assert cfg.sinks.webhook is not None and cfg.sinks.webhook.max_age_h == 24
    assert "queue_size is no longer used" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="pipeline.config"):
        parse_config({**base, "sinks": {"kafka": {"max_age_h": 2}}}, env={})
    assert caplog.text == ""
    with pytest.raises(ConfigError, match=r"sinks\.kafka\.max_age_h"):
        parse_config({**base, "sinks": {"kafka": {"max_age_h": 0}}}, env={})


def test_the_default_retention_never_refuses_a_long_retrain_lookback() -> None:
    """A configuration from before retention existed, with a lookback of 120 days, still loads: the default keeps
    twice the lookback. Written out, a retention that does not cover the lookback is refused."""
    raw = _raw()
    del raw["retention"]  # the example has one
    raw["retrain"] = {"lookback_days": 120}
    assert parse_config(raw, env={}).retention.scores_days == 240
    raw["retention"] = {"scores_days": 100}
    with pytest.raises(ConfigError, match=r"retention\.scores_days \(100\) must be more than retrain\.lookback_days"):
        parse_config(raw, env={})
    raw["retrain"] = {"lookback_days": 7}
    assert parse_config(raw, env={}).retention.scores_days == 100
    del raw["retention"]
    assert parse_config(raw, env={}).retention.scores_days == 90
    raw["retrain"] = {"lookback_days": 60}  # the default covers it: untouched, and so is a user's alerts_days
    raw["retention"] = {"alerts_days": 100}
    assert parse_config(raw, env={}).retention.scores_days == 90
    raw["retrain"] = {"lookback_days": "${LB}"}  # from the environment: a string
    raw["retention"] = {"alerts_days": 200}
    assert parse_config(raw, env={"LB": "120"}).retention.scores_days == 200  # no more than alerts_days
    for off in (False, None, []):  # not a section: refused as before, never read as "retention on"
        raw["retention"] = off
        with pytest.raises(ConfigError, match="retention"):
            parse_config(raw, env={"LB": "120"})
    raw["retention"] = {"enabled": False, "alerts_days": 100}  # disabled: nothing raised, and it loads
    assert parse_config(raw, env={"LB": "120"}).retention.scores_days == 90


def test_model_bundles_retention_defaults_to_ten_and_null_keeps_all() -> None:
    raw = _raw()
    del raw["retention"]
    assert parse_config(raw, env={}).retention.model_bundles == 10
    raw["retention"] = {"model_bundles": None}
    assert parse_config(raw, env={}).retention.model_bundles is None
    raw["retention"] = {"model_bundles": 0}  # the rollback target and what to look into would go: refused
    with pytest.raises(ConfigError, match=r"retention\.model_bundles: Input should be greater than 0"):
        parse_config(raw, env={})


def test_a_disabled_webhook_needs_no_url_and_an_enabled_one_does() -> None:
    base = {"groups": [{"name": "g", "assets": ["a"], "sensors": [{"name": "x"}]}]}
    off = parse_config({**base, "sinks": {"webhook": {"enabled": False}}}, env={})
    assert off.sinks.webhook is not None and not off.sinks.webhook.enabled
    with pytest.raises(ConfigError, match=r"sinks\.webhook: .*url is required while the webhook is enabled"):
        parse_config({**base, "sinks": {"webhook": {"timeout_s": 2}}}, env={})


@pytest.mark.parametrize(("webhook", "message"), [
    ({"url": "https://h.example/hooks/T0KEN\x7f"}, r"sinks\.webhook\.url: .*url contains a control character"),
    ({"url": "https://[::1/T0KEN"}, r"sinks\.webhook\.url: .*url is not a valid URL \(Invalid IPv6 URL\)"),
    ({"url": "https://h.example/x", "headers": {"Authorization": "Bearer T0KEN\n"}},
     r"sinks\.webhook\.headers: .*header Authorization contains a control character"),
    ({"url": "https://h.example/x", "headers": {"X Token": "T0KEN"}}, r"header name 'X Token' is not a valid"),
    ({"url": "https://user:T0KEN@h.example/hook"}, r"url holds a user name or password"),
    ({"url": "https://h.example:T0KEN/hook"}, r"url is not a valid URL \(Port could not be cast"),
])
def test_webhook_urls_and_headers_the_client_cannot_send_are_refused_without_their_secret(
        webhook: dict[str, object], message: str) -> None:
    """Before, they passed and every try logged the exception's text, the header value or URL token with it."""
    base = {"groups": [{"name": "g", "assets": ["a"], "sensors": [{"name": "x"}]}]}
    with pytest.raises(ConfigError, match=message) as refused:
        parse_config({**base, "sinks": {"webhook": webhook}}, env={})
    assert "T0KEN" not in str(refused.value)


def test_webhook_headers_over_plain_http_are_warned_of(caplog: pytest.LogCaptureFixture) -> None:
    base = {"groups": [{"name": "g", "assets": ["a"], "sensors": [{"name": "x"}]}]}
    with caplog.at_level("WARNING", logger="pipeline.config"):
        parse_config({**base, "sinks": {"webhook": {"url": "https://h.example/x", "headers": {"A": "T0KEN"}}}}, env={})
        assert caplog.text == ""
        parse_config({**base, "sinks": {"webhook": {"url": "http://h.example/x", "headers": {"A": "T0KEN"}}}}, env={})
    assert "headers (A) are sent over plain http to h.example" in caplog.text and "T0KEN" not in caplog.text


@pytest.mark.parametrize(("name", "assets", "message"), [
    ("..", ["a"], r"groups\[0\]\.name: String should match pattern"),  # its bundles went outside model_dir
    (".hidden", ["a"], r"groups\[0\]\.name: String should match pattern"),
    ("g" * 62, ["a"], r"groups\[0\]\.name: String should have at most 61 characters"),  # versions hold 80
    ("pumps", ["a\nb"], r"groups\[0\]\.assets\[0\]: String should match pattern"),
    ("pumps", ["x" * 121], r"groups\[0\]\.assets\[0\]: String should have at most 120 characters"),
])
def test_group_and_asset_names_that_cannot_be_stored_are_refused(name: str, assets: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({"groups": [{"name": name, "assets": assets, "sensors": [{"name": "x"}]}]}, env={})
    ok = parse_config({"groups": [{"name": "g" * 61, "assets": ["plant 1/pump-7"], "sensors": [{"name": "x"}]}]},
                      env={})
    assert ok.groups[0].assets == ["plant 1/pump-7"]


@pytest.mark.parametrize(("where", "name"), [(("kafka", "topic"), "sensor readings"),
                                             (("kafka", "dead_letter_topic"), ".."),
                                             (("sinks", "kafka", "topic"), "alerts/plant-1"),
                                             (("kafka", "topic"), "t" * 250)])
def test_a_topic_name_kafka_refuses_is_a_configuration_error(where: tuple[str, ...], name: str) -> None:
    raw = _raw()
    node = raw
    for key in where[:-1]:
        node = node.setdefault(key, {})
    node[where[-1]] = name
    with pytest.raises(ConfigError, match=re.escape(".".join(where)) + ": .*a Kafka topic name is 1 to 249 ASCII"):
        parse_config(raw, env={})
    node[where[-1]] = "plant-1.sensor_readings" + "t" * 200  # letters, digits, '.', '_' and '-', up to 249: fine
    parse_config(raw, env={})



def test_the_readings_dead_letter_and_alert_topics_must_be_apart() -> None:
    raw = _raw()
    raw["kafka"]["dead_letter_topic"] = raw["kafka"]["topic"]
    with pytest.raises(ConfigError, match=r"dead_letter_topic must not be kafka\.topic: rejected readings"):
        parse_config(raw, env={})
    raw = _raw()
    raw.setdefault("sinks", {})["kafka"] = {"topic": raw["kafka"].get("dead_letter_topic", "sensor-readings-dlq")}
    with pytest.raises(ConfigError, match=r"sinks\.kafka\.topic must be a topic of its own"):
        parse_config(raw, env={})
