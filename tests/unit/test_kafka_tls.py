"""TLS files of ``kafka.security`` are loaded before any Kafka client is made: each problem names its key, and an
encrypted key without its password is reported instead of making OpenSSL ask for a pass phrase on the terminal."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from pipeline import kafka_io
from pipeline.config import KafkaConfig, parse_config
from pipeline.errors import ConfigError
from pipeline.localinfra.tls import KEY_PASSWORD, Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("tls"))


def _kafka(**security: Any) -> KafkaConfig:
    return KafkaConfig.model_validate({"security": {"protocol": "SSL", **security}})


def test_a_valid_mutual_tls_setup_has_no_problems_and_gives_the_clients_its_files(pki: Pki) -> None:
    cfg = _kafka(ssl_cafile=str(pki.ca), ssl_certfile=str(pki.client_cert), ssl_keyfile=str(pki.client_key))
    assert kafka_io.tls_problems(cfg) == []
    kwargs = kafka_io.client_kwargs(cfg)
    assert (kwargs["ssl_cafile"], kwargs["ssl_certfile"], kwargs["ssl_keyfile"]) == (
        str(pki.ca), str(pki.client_cert), str(pki.client_key))
    assert "ssl_password" not in kwargs


def test_an_encrypted_key_loads_with_its_password_which_reaches_the_clients(pki: Pki) -> None:
    cfg = _kafka(ssl_cafile=str(pki.ca), ssl_certfile=str(pki.client_cert), ssl_keyfile=str(pki.client_key_encrypted),
                 ssl_key_password=KEY_PASSWORD)
    assert kafka_io.tls_problems(cfg) == []
    assert kafka_io.client_kwargs(cfg)["ssl_password"] == KEY_PASSWORD
    assert KEY_PASSWORD not in repr(cfg)  # a secret: masked wherever the config is shown


def test_each_problem_names_its_key(pki: Pki, tmp_path: Path) -> None:
    def problems(**security: Any) -> list[str]:
        return kafka_io.tls_problems(_kafka(**security))

    cert = {"ssl_certfile": str(pki.client_cert)}
    assert problems(ssl_cafile=str(tmp_path / "missing.pem")) == [
        f"kafka.security.ssl_cafile: cannot read {tmp_path / 'missing.pem'} (No such file or directory)"]
    assert problems(ssl_cafile=str(pki.client_key)) == [
        f"kafka.security.ssl_cafile: {pki.client_key} holds no PEM certificate (NO_CERTIFICATE_OR_CRL_FOUND)"]
    assert problems(**cert, ssl_keyfile=str(pki.client_key_encrypted)) == [
        f"kafka.security.ssl_keyfile: {pki.client_key_encrypted} is encrypted; give its password in "
        "kafka.security.ssl_key_password (for example ${KAFKA_KEY_PASSWORD})"]
    assert problems(**cert, ssl_keyfile=str(pki.client_key_encrypted), ssl_key_password="wrong") == [
        f"kafka.security.ssl_key_password: does not decrypt {pki.client_key_encrypted}"]
    other_key = pki.ca.with_name("broker.key")  # the broker's key: a key, not this certificate's
    assert problems(**cert, ssl_keyfile=str(other_key)) == [
        f"kafka.security.ssl_keyfile: {other_key} is not the key of the certificate in {pki.client_cert}"]
    broker_cert = pki.ca.with_name("broker.pem")  # decrypted with the right password, but not this certificate's key
    assert problems(ssl_certfile=str(broker_cert), ssl_keyfile=str(pki.client_key_encrypted),
                    ssl_key_password=KEY_PASSWORD) == [
        f"kafka.security.ssl_keyfile: {pki.client_key_encrypted} is not the key of the certificate in {broker_cert}"]
    assert problems(ssl_certfile=str(pki.client_key), ssl_keyfile=str(pki.client_key))[0].startswith(
        f"kafka.security.ssl_certfile: {pki.client_key} and {pki.client_key} do not load as a PEM certificate")
    both_missing = problems(ssl_cafile="/nonexistent/ca.pem", ssl_certfile="/nonexistent/client.pem",
                            ssl_keyfile=str(pki.client_key))
    assert [p.split(":")[0] for p in both_missing] == ["kafka.security.ssl_cafile", "kafka.security.ssl_certfile"]


def test_no_client_is_made_while_a_tls_file_does_not_load(tmp_path: Path) -> None:
    cfg = _kafka(ssl_cafile=str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match=r"kafka\.security\.ssl_cafile: cannot read"):
        kafka_io.make_producer(cfg)
    with pytest.raises(ConfigError, match=r"kafka\.security\.ssl_cafile: cannot read"):
        kafka_io.topic_partitions(cfg, ["t"], timeout_s=1)


def test_a_key_without_its_certificate_is_a_configuration_error_where_tls_is_used() -> None:
    def parse(protocol: str) -> None:
        parse_config({"kafka": {"security": {"protocol": protocol, "ssl_keyfile": "/etc/client.key",
                                             "sasl_mechanism": "PLAIN", "sasl_username": "u"}},
                      "groups": [{"name": "g", "assets": ["a"], "sensors": [{"name": "x"}]}]}, env={})

    for protocol in ("SSL", "SASL_SSL"):
        with pytest.raises(ConfigError, match=r"kafka.security: .*ssl_keyfile needs ssl_certfile"):
            parse(protocol)
    parse("SASL_PLAINTEXT")  # a leftover TLS setting of a protocol without TLS stays harmless
    parse("PLAINTEXT")


def test_tls_files_are_left_alone_by_protocols_without_tls(tmp_path: Path) -> None:
    for protocol in ("PLAINTEXT", "SASL_PLAINTEXT"):
        cfg = KafkaConfig.model_validate({"security": {
            "protocol": protocol, "sasl_mechanism": "PLAIN", "sasl_username": "u",
            "ssl_cafile": str(tmp_path / "old-ca.pem")}})
        assert kafka_io.tls_problems(cfg) == []
        assert kafka_io.client_kwargs(cfg)["security_protocol"] == protocol


def test_run_stops_with_the_key_and_exit_status_2_before_connecting(tmp_path: Path) -> None:
    import numpy as np
    import yaml
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.config import load_config
    from pipeline.store.db import session_scope, upgrade
    from pipeline.train import register_trained, train_group
    from pipeline.types import Window

    path = tmp_path / "plant.yaml"
    url = f"sqlite:///{tmp_path / 'sw.db'}"
    path.write_text(yaml.safe_dump({
        "kafka": {"bootstrap_servers": "127.0.0.1:1", "security": {"protocol": "SSL",
                                                                    "ssl_cafile": str(tmp_path / "ca.pem")}},
        "database": {"url": url}, "model_dir": str(tmp_path / "models"), "metrics": {"port": 0},
        "groups": [{"name": "g", "assets": ["a"], "sensors": [{"name": "x"}], "model": {"epochs": 1}}]}))
    config = load_config(path)
    upgrade(url)
    rng = np.random.default_rng(0)
    windows = [Window("a", "g", i * 5000, i * 5000 + 30000, rng.normal(size=(30, 1))) for i in range(200)]
    with session_scope(url, write=True) as session:
        register_trained(session=session, trained=train_group(windows, config.groups[0], progress=False),
                         group=config.groups[0], model_dir=config.model_dir)
    result = CliRunner().invoke(app, ["run", "--config", str(path)])
    assert result.exit_code == 2
    assert f"kafka.security.ssl_cafile: cannot read {tmp_path / 'ca.pem'}" in result.output
    assert "cannot connect" not in result.output  # it never tried the (unreachable) broker
    assert "metrics on http" not in result.output  # nor started anything else



def test_the_admin_clients_configuration_dump_is_logged_without_its_secrets(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("DEBUG", logger="kafka.admin.client"):  # kafka-python's own call, as its __init__ makes it
        logging.getLogger("kafka.admin.client").debug(
            "Starting KafkaAdminClient with configuration: %s",
            {"bootstrap_servers": ["k:9094"], "sasl_plain_username": "sw", "sasl_plain_password": "pw-1234",
             "ssl_password": "key-5678", "ssl_cafile": None})
    assert "'sasl_plain_username': 'sw'" in caplog.text and "'bootstrap_servers': ['k:9094']" in caplog.text
    assert "pw-1234" not in caplog.text and "key-5678" not in caplog.text
