"""Local stand-ins for the service's infrastructure, for tests and the demo: a real Kafka broker
(KRaft, jars from Maven Central) and a throwaway PostgreSQL cluster, each a child process of ours.

    with LocalKafka() as kafka, LocalPostgres() as pg:
        run(kafka.bootstrap_servers, pg.url)

From a shell: `python -m pipeline.localinfra kafka|postgres|jars`.
"""

from pipeline.localinfra._util import LocalInfraError
from pipeline.localinfra.kafka import LocalKafka, ensure_jars, kafka_error, wait_for_kafka
from pipeline.localinfra.postgres import LocalPostgres

__all__ = ["LocalInfraError", "LocalKafka", "LocalPostgres", "ensure_jars", "kafka_error", "wait_for_kafka"]
