"""``sensorwatch check`` against a real broker and a real PostgreSQL: a deployment ready to start passes, a missing
dead-letter topic is a warning, a missing readings topic a failure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from pipeline import kafka_io
from pipeline.cli import app
from pipeline.config import load_config
from pipeline.store.db import session_scope, upgrade
from pipeline.train import register_trained, train_group
from pipeline.types import Window

pytestmark = pytest.mark.integration


def test_check_passes_a_ready_deployment_and_names_what_is_missing(kafka_bootstrap_servers: str, topic_name: str,
                                                                    pg_database_url: str, tmp_path: Path) -> None:
    path = tmp_path / "plant.yaml"
    path.write_text(yaml.safe_dump({
        "kafka": {"bootstrap_servers": kafka_bootstrap_servers, "topic": topic_name,
                  "dead_letter_topic": f"{topic_name}-dlq"},
        "database": {"url": pg_database_url}, "model_dir": str(tmp_path / "models"), "metrics": {"port": 0},
        "groups": [{"name": "g", "assets": ["a"], "sensors": [{"name": "x"}, {"name": "y"}],
                    "model": {"epochs": 1}}]}))
    config = load_config(path)
    upgrade(pg_database_url)
    group = config.groups[0]
    rng = np.random.default_rng(0)
    windows = [Window("a", "g", i * 5000, i * 5000 + 30000, rng.normal(size=(30, 2))) for i in range(200)]
    with session_scope(pg_database_url, write=True) as session:
        register_trained(session=session, trained=train_group(windows, group, progress=False), group=group,
                         model_dir=config.model_dir)

    def statuses() -> tuple[int, dict[str, tuple[str, str]]]:
        result = CliRunner().invoke(app, ["check", "--config", str(path), "--format", "json"])
        return result.exit_code, {c["name"]: (c["status"], c["detail"]) for c in json.loads(result.stdout)}

    code, found = statuses()
    assert code == 1 and found["readings topic"][0] == "fail"  # nothing to consume yet
    assert found["database"][0] == found["models"][0] == found["kafka"][0] == "ok"
    kafka_io.ensure_topics(config.kafka, [topic_name], partitions=3)
    code, found = statuses()
    assert code == 0 and found["readings topic"] == ("ok", f"{topic_name}: 3 partition(s); up to 3 pipeline "
                                                            "process(es) of group sensorwatch share them")
    assert found["dead-letter topic"][0] == "warn"  # a warning only: the exit status stays 0
    kafka_io.ensure_topics(config.kafka, [f"{topic_name}-dlq"], partitions=1)
    code, found = statuses()
    assert code == 0 and all(status == "ok" for status, _ in found.values()), found


@pytest.mark.parametrize(("security", "expected"), [
    ({"protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN", "sasl_username": "u", "sasl_password": "p"},
     "IllegalSaslState"),
    ({"protocol": "SSL"}, "Handshake failed"),
])
def test_check_says_why_a_broker_with_other_security_settings_did_not_answer(
        kafka_bootstrap_servers: str, tmp_path: Path, security: dict[str, str], expected: str) -> None:
    path = tmp_path / "plant.yaml"  # the test broker speaks PLAINTEXT
    path.write_text(yaml.safe_dump({
        "kafka": {"bootstrap_servers": kafka_bootstrap_servers, "security": security},
        "database": {"url": f"sqlite:///{tmp_path / 'sw.db'}"},
        "groups": [{"name": "g", "assets": ["a"], "sensors": [{"name": "x"}]}]}))
    result = CliRunner().invoke(app, ["check", "--config", str(path), "--kafka-timeout-s", "3", "--format", "json"])
    kafka = next(c for c in json.loads(result.stdout) if c["name"] == "kafka")
    assert result.exit_code == 1 and kafka["status"] == "fail"
    assert "last connection error" in kafka["detail"] and expected in kafka["detail"], kafka["detail"]
