"""The only module that talks to Kafka: consumer, producer, dead-letter topic, topic creation, offset commits, and
reading the topic back by time for retraining."""

from __future__ import annotations

import contextlib
import logging
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType, NewTopic
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import (
    CorruptRecordError,
    GroupAuthorizationFailedError,
    InvalidRecordError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
)
from kafka.producer.future import FutureRecordMetadata
from kafka.structs import OffsetAndMetadata

from pipeline.config import KafkaConfig
from pipeline.errors import ConfigError, TransientError
from pipeline.types import Rejected

log = logging.getLogger(__name__)

#: Client settings that hold a secret (kafka-python's names).
_SECRET_SETTINGS = frozenset({"sasl_plain_password", "ssl_password"})


class _MaskSecretSettings(logging.Filter):
    """kafka-python's admin client logs its whole configuration at DEBUG ("Starting KafkaAdminClient with
    configuration: {...}"), passwords included: the secret settings are masked in that record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, Mapping) and _SECRET_SETTINGS & set(record.args):
            record.args = {k: "**********" if k in _SECRET_SETTINGS and v else v for k, v in record.args.items()}
        return True


logging.getLogger("kafka.admin.client").addFilter(_MaskSecretSettings())

# partitions added to the topic are assigned within this (kafka-python waits 5 minutes by default, and meanwhile the
# assets keyed onto them look silent: their windows are closed idle on forward-filled data, or skipped)
METADATA_MAX_AGE_MS = 30_000


def tls_problems(cfg: KafkaConfig) -> list[str]:
    """What keeps the TLS files of ``cfg.security`` from loading, one ``kafka.security.<key>: reason`` each; empty
    when they load, none are set, or the protocol uses no TLS. Loads them as the clients will, except that an
    encrypted key without ``ssl_key_password`` is reported instead of making OpenSSL ask for its pass phrase on the
    terminal."""
    s = cfg.security
    if not s.tls:  # PLAINTEXT and SASL_PLAINTEXT: the clients leave the TLS files alone
        return []
    files = {key: getattr(s, key) for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile") if getattr(s, key)}
    problems = []
    for key, path in files.items():
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            problems.append(f"kafka.security.{key}: cannot read {path} ({exc.strerror})")
    if problems:
        return problems
    context = ssl.create_default_context()
    if s.ssl_cafile:
        try:
            context.load_verify_locations(cafile=s.ssl_cafile)
        except ssl.SSLError as exc:
            problems.append(f"kafka.security.ssl_cafile: {s.ssl_cafile} holds no PEM certificate ({exc.reason})")
    if s.ssl_certfile:
        asked: list[bool] = []
        password = s.ssl_key_password.get_secret_value() if s.ssl_key_password else ""

        def give_password() -> str:  # OpenSSL calls it only for an encrypted key
            asked.append(True)
            return password

        key = s.ssl_keyfile or s.ssl_certfile
        try:
            context.load_cert_chain(s.ssl_certfile, s.ssl_keyfile, password=give_password)
        except ssl.SSLError as exc:
            if exc.reason == "KEY_VALUES_MISMATCH":  # decrypted (if it was encrypted), but another certificate's
                problems.append(f"kafka.security.ssl_keyfile: {key} is not the key of the certificate in "
                                f"{s.ssl_certfile}")
            elif asked and not s.ssl_key_password:
                problems.append(f"kafka.security.ssl_keyfile: {key} is encrypted; give its password in "
                                "kafka.security.ssl_key_password (for example ${KAFKA_KEY_PASSWORD})")
            elif asked:
                problems.append(f"kafka.security.ssl_key_password: does not decrypt {key}")
            else:
                problems.append(f"kafka.security.ssl_certfile: {s.ssl_certfile} and {key} do not load as a PEM "
                                f"certificate and its private key ({exc.reason or exc})")
    return problems


def client_kwargs(cfg: KafkaConfig) -> dict[str, Any]:
    """``cfg.client_kwargs()`` once its TLS files load (``tls_problems``); ConfigError naming each problem."""
    problems = tls_problems(cfg)
    if problems:
        raise ConfigError("; ".join(problems))
    return cfg.client_kwargs()


@dataclass(frozen=True, slots=True)
class RawRecord:
    """A polled record, reduced to what the pipeline needs."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, on_revoked: Callable[[set[int]], None], on_assigned: Callable[[set[int]], None],
                 on_lost: Callable[[set[int]], None]) -> None:
        self._revoked, self._assigned, self._lost = on_revoked, on_assigned, on_lost

    def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        self._revoked({tp.partition for tp in revoked})

    def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        self._assigned({tp.partition for tp in assigned})

    def on_partitions_lost(self, lost: Iterable[TopicPartition]) -> None:
        self._lost({tp.partition for tp in lost})


def make_consumer(cfg: KafkaConfig, *, on_revoked: Callable[[set[int]], None] | None = None,
                  on_assigned: Callable[[set[int]], None] | None = None,
                  on_lost: Callable[[set[int]], None] | None = None,
                  stop: threading.Event | None = None,
                  while_waiting: Callable[[], None] | None = None) -> KafkaConsumer:
    """A consumer in ``cfg.group_id`` subscribed to the readings topic, with auto-commit off.

    ``on_lost`` is called when the group evicted this consumer (its fetch positions are gone); default: on_revoked.
    It joins the group only once the broker reports the topic's partitions (``wait_for_partitions``; ``stop`` ends
    the wait; ``while_waiting`` is called with each of its warnings).
    """
    consumer = KafkaConsumer(
        group_id=cfg.group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=cfg.max_poll_records,
        fetch_max_bytes=max(cfg.max_message_bytes * 64, 52428800),
        max_partition_fetch_bytes=max(cfg.max_message_bytes * 16, 1048576),
        session_timeout_ms=cfg.session_timeout_ms,
        heartbeat_interval_ms=max(cfg.session_timeout_ms // 3, 500),
        metadata_max_age_ms=METADATA_MAX_AGE_MS,
        allow_auto_create_topics=False,
        **client_kwargs(cfg),
    )
    no_topic_creation(consumer)
    revoked = on_revoked or (lambda _p: None)
    listener = _Rebalance(revoked, on_assigned or (lambda _p: None), on_lost or revoked)
    try:
        wait_for_partitions(consumer, cfg.topic, stop, while_waiting=while_waiting)
    except BaseException:
        consumer.close(autocommit=False)
        raise
    consumer.subscribe([cfg.topic], listener=listener)
    return consumer


def no_topic_creation(consumer: KafkaConsumer) -> None:
    """Keep ``consumer``'s metadata requests from creating topics (sensorwatch creates none): on brokers with
    auto.create.topics.enable a deleted readings topic came back at once, with the brokers' default partitions, and
    the operator's own create failed. kafka-python 3.0 does not hand the consumer's ``allow_auto_create_topics`` to
    the cluster metadata that makes those requests, so it is set there too."""
    config = getattr(getattr(getattr(consumer, "_client", None), "cluster", None), "config", None)
    if isinstance(config, dict):
        config["allow_auto_create_topics"] = False


def wait_for_partitions(consumer: KafkaConsumer, topic: str, stop: threading.Event | None = None, *,
                        interval_s: float = 1.0, warn_every_s: float = 30.0,
                        while_waiting: Callable[[], None] | None = None) -> set[int]:
    """Block until the broker reports partitions of ``topic`` (a warning every ``warn_every_s`` while it does not,
    and a call of ``while_waiting``: the process is alive); returns them, or an empty set when ``stop`` is set
    first.

    Why: a consumer that joins its group before it knows the topic's partitions is assigned nothing, and the
    rebalance that follows once they appear can be lost by kafka-python 3.0 when a poll times out during its
    SyncGroup: the group counts the member as assigned, the consumer fetches nothing, and it stays idle until the
    next rebalance (seen in this project's tests as minutes without a single window scored).
    """
    waited = 0.0
    while True:
        partitions = consumer.partitions_for_topic(topic)
        if partitions or (stop is not None and stop.is_set()):
            return set(partitions or ())
        if waited % warn_every_s < interval_s:
            log.warning("topic %s has no partitions yet (does it exist?): waiting before joining the group", topic)
            if while_waiting is not None:
                while_waiting()
        if stop is not None:
            stop.wait(interval_s)
        else:
            time.sleep(interval_s)
        waited += interval_s


def make_producer(cfg: KafkaConfig, **overrides: object) -> KafkaProducer:
    """A producer that waits for all in-sync replicas (records must not be lost)."""
    options: dict[str, object] = {"acks": "all", "linger_ms": 5, "retries": 5, **overrides}
    return KafkaProducer(**client_kwargs(cfg), **options)


def poll(consumer: KafkaConsumer, timeout_ms: int, max_records: int) -> list[RawRecord]:
    """One poll, flattened and ordered by partition then offset (``recover_lost_assignment`` after it)."""
    batches = consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
    recover_lost_assignment(consumer)
    records = [
        RawRecord(r.topic, r.partition, r.offset, r.key, r.value, r.timestamp)
        for tp in sorted(batches, key=lambda t: t.partition)
        for r in batches[tp]
    ]
    return records


def recover_lost_assignment(consumer: KafkaConsumer) -> bool:
    """Undo a kafka-python 3.0 race; True when it asked the group for a rejoin.

    A poll that times out while a JoinGroup/SyncGroup is in flight leaves the join running. When the rejoin was
    caused by new topic metadata (the leader's assignment snapshot), the leader's snapshot is updated inside that
    join, so the next poll sees nothing to rejoin and never applies the finished join's assignment: the group counts
    the member as owning partitions, and the consumer fetches nothing until the next rebalance. That state (a
    finished join that was never taken up, and no rejoin pending) is recognised here and a rejoin is requested. It
    reads the coordinator's internals, guarded: with a library that lacks them this does nothing.
    """
    coordinator = getattr(consumer, "_coordinator", None)
    task = getattr(coordinator, "_join_task", None)
    if coordinator is None or task is None or not getattr(task, "is_done", False) or coordinator.need_rejoin():
        return False
    log.warning("the consumer group's last join finished but its assignment was never applied (a kafka-python "
                "race): rejoining the group")
    coordinator.request_rejoin()
    return True


def _dead_letter_value(rejected: Rejected, max_value_bytes: int) -> bytes:
    value = rejected.value if rejected.value is not None else b""
    return value if len(value) <= max_value_bytes else value[:max_value_bytes]


def send_dead_letters(producer: KafkaProducer, topic: str, rejected: Sequence[Rejected], timeout_s: float = 30,
                      max_value_bytes: int = 512 * 1024) -> None:
    """Publish rejected messages to the dead-letter topic and wait until the broker has them all.

    The original bytes are the record value (so nothing is lost; only a value above ``max_value_bytes`` is cut to
    that size, with its original size in the ``size`` header); the reason, detail and source are in headers.
    TransientError if the broker does not acknowledge in time.
    """
    if not rejected:
        return
    try:
        futures = [
            producer.send(
                topic,
                key=r.key,
                value=_dead_letter_value(r, max_value_bytes),
                headers=[
                    ("reason", r.reason.encode()),
                    ("detail", r.detail[:500].encode()),
                    ("source", f"{r.topic}/{r.partition}/{r.offset}".encode()),
                    ("size", str(len(r.value or b"")).encode()),
                    ("partial", b"true" if r.partial else b"false"),
                ],
            )
            for r in rejected
        ]
        producer.flush(timeout=timeout_s)
        for future in futures:
            future.get(timeout=timeout_s)
    except TopicAuthorizationFailedError as exc:
        raise TransientError(f"not allowed to write the dead-letter topic {topic} ({type(exc).__name__}): grant "
                             "WRITE on it to the principal of kafka.security (`sensorwatch check` tells)") from exc
    except KafkaError as exc:
        raise TransientError(f"dead-letter topic {topic} unavailable: {exc} (does it exist? a broker that does not "
                             "create topics on first use needs it created; `sensorwatch check` tells)") from exc


def send_json_each(producer: KafkaProducer, topic: str, messages: Sequence[tuple[bytes | None, object]],
                   timeout_s: float = 10) -> list[Exception | None]:
    """Publish ``(key, document)`` pairs as compact JSON (e.g. alert events), in order, and read the broker's answer to
    each up to the first failure: one entry per message up to and including it, None where the broker has the message,
    else the error (``record_refused`` tells one that no retry fixes). A message the producer does not take (no
    metadata within its ``max_block_ms``, above its ``max_request_size``) ends the list with that error. The answers
    are awaited for ``timeout_s`` in all; one not there by then is a KafkaTimeoutError.

    A failure may be another record's: after a record that fails for good, kafka-python fails the producer's records
    still in flight with the same error, so the caller should close this producer and try such a message again alone.
    """
    futures: list[FutureRecordMetadata] = []
    refused: Exception | None = None
    for key, doc in messages:
        try:
            futures.append(producer.send(topic, key=key, value=orjson.dumps(doc)))
        except Exception as exc:
            refused = exc
            break
    deadline = time.monotonic() + timeout_s
    # the futures tell each record's fate; flush itself raises when a batch was split after MESSAGE_TOO_LARGE
    # (UnknownError "Future not done", kafka-python 3.0.12) or runs out of time
    with contextlib.suppress(KafkaError):
        producer.flush(timeout=timeout_s)
    results: list[Exception | None] = []
    for future in futures:
        try:
            future.get(timeout=max(deadline - time.monotonic(), 0.0))
        except Exception as exc:
            return [*results, exc]
        results.append(None)
    return results if refused is None else [*results, refused]


#: Broker answers about the record itself (too large, invalid): the same record is refused whenever it is sent.
_RECORD_REFUSED = (MessageSizeTooLargeError, RecordListTooLargeError, InvalidRecordError, CorruptRecordError)


def record_refused(exc: BaseException) -> bool:
    """Whether ``exc`` refuses its record for good, whatever the broker's state: too large for the topic or the
    producer, failed the broker's validation. Anything else (a broker down, timeouts, no leader, and also no
    authorization or a failed login, which an operator fixes on the cluster) may pass on a later try."""
    return isinstance(exc, _RECORD_REFUSED)


def commit(consumer: KafkaConsumer, topic: str, offsets: Mapping[int, int]) -> None:
    """Commit ``partition -> next offset to read`` for partitions this consumer still owns."""
    owned = {tp.partition for tp in consumer.assignment()}
    payload = {
        TopicPartition(topic, p): OffsetAndMetadata(o, "", -1) for p, o in offsets.items() if p in owned
    }
    if payload:
        consumer.commit(offsets=payload, timeout_ms=30_000)


def read_since(cfg: KafkaConfig, since_ms: int, *, timeout_s: float, max_records: int = 5000
               ) -> Iterator[list[RawRecord]]:
    """The readings topic from the first record stamped at or after ``since_ms`` (Kafka record timestamps, found with
    ``offsets_for_times``) up to the end offsets captured when reading starts, in batches (offset order per
    partition).

    Uses a consumer outside any group (``group_id=None``, manual assignment): it commits nothing and never joins the
    pipeline's group. TransientError when the broker has not delivered up to the captured ends within ``timeout_s``.
    """
    with connection_errors() as seen:
        try:
            consumer = KafkaConsumer(
                group_id=None, enable_auto_commit=False, auto_offset_reset="earliest", max_poll_records=max_records,
                allow_auto_create_topics=False,
                fetch_max_bytes=max(cfg.max_message_bytes * 64, 52428800),
                max_partition_fetch_bytes=max(cfg.max_message_bytes * 16, 1048576), **client_kwargs(cfg),
            )
            no_topic_creation(consumer)
        except KafkaError as exc:
            why = last_failure(seen, sasl=cfg.security.sasl)
            raise TransientError(f"cannot read {cfg.topic} back: {exc}{why}") from exc
    try:
        partitions = consumer.partitions_for_topic(cfg.topic) or set()
        tps = [TopicPartition(cfg.topic, p) for p in sorted(partitions)]
        if not tps:
            return
        ends = consumer.end_offsets(tps)
        starts = consumer.offsets_for_times({tp: since_ms for tp in tps})
        todo = {tp: ends[tp] for tp in tps if starts.get(tp) is not None and starts[tp].offset < ends[tp]}
        if not todo:
            return
        consumer.assign(list(todo))
        for tp in todo:
            consumer.seek(tp, starts[tp].offset)
        deadline = time.monotonic() + timeout_s
        while todo:
            if time.monotonic() > deadline:
                raise TransientError(f"reading {cfg.topic} back: partitions {sorted(tp.partition for tp in todo)} "
                                     f"not read to their end within {timeout_s:.0f}s")
            batches = consumer.poll(timeout_ms=500, max_records=max_records)
            out = [
                RawRecord(r.topic, r.partition, r.offset, r.key, r.value, r.timestamp)
                for tp in sorted(batches, key=lambda t: t.partition) if tp in todo
                for r in batches[tp] if r.offset < todo[tp]
            ]
            for tp in list(todo):
                if consumer.position(tp) >= todo[tp]:
                    del todo[tp]
                    consumer.pause(tp)
            if out:
                yield out
    except KafkaError as exc:
        raise TransientError(f"reading {cfg.topic} back failed: {exc}") from exc
    finally:
        consumer.close(autocommit=False)


def lag(consumer: KafkaConsumer) -> dict[int, int]:
    """Records between this consumer's position and the log end, per assigned partition (from fetch metadata)."""
    out: dict[int, int] = {}
    for tp in consumer.assignment():
        highwater = consumer.highwater(tp)
        if highwater is not None:
            with contextlib.suppress(KafkaError):
                out[tp.partition] = max(highwater - consumer.position(tp, timeout_ms=1000), 0)
    return out


def topic_id(consumer: object, topic: str) -> str | None:
    """The brokers' id of ``topic`` as this consumer's metadata has it (Kafka 2.8+ gives each topic one, and a topic
    deleted and re-created under its name gets a new one); None when it has none (older brokers, or no metadata of
    the topic yet). kafka-python keeps it in its client's cluster metadata, which has no public accessor."""
    cluster = getattr(getattr(consumer, "_client", None), "cluster", None)
    lookup = getattr(cluster, "topic_id", None)
    found = lookup(topic) if callable(lookup) else None
    return str(found) if found is not None else None


def lag_to_end(consumer: KafkaConsumer, timeout_ms: int = 1000, in_hand: Mapping[int, int] | None = None
               ) -> dict[int, int]:
    """Records between this consumer's position and the log end, per assigned partition, with the log end asked of
    the broker now (``lag`` reads it from the last fetch, which a stalled loop does not make); a partition whose
    position is not known yet (after a rebalance) is left out, and all are when the broker does not answer within
    ``timeout_ms``. ``in_hand``: per partition the first offset of a polled batch not processed yet (a stalled
    loop holds it), counted from there."""
    owned = list(consumer.assignment())
    if not owned:
        return {}
    try:
        ends = consumer.end_offsets(owned, timeout_ms=timeout_ms)
        positions = {tp: consumer.position(tp, timeout_ms=0) for tp in owned}
    except KafkaError:
        return {}
    held = in_hand or {}
    return {tp.partition: max(ends[tp] - min(at, held.get(tp.partition, at)), 0)
            for tp, at in positions.items() if at is not None and tp in ends}


def caught_up(consumer: KafkaConsumer, partitions: set[int], timeout_ms: int = 5000) -> set[int] | None:
    """The given partitions whose log end this consumer has reached, asked of the broker now (None if it does not
    answer): only there can a silent asset be told from data not read yet."""
    owned = {tp.partition: tp for tp in consumer.assignment() if tp.partition in partitions}
    if not owned:
        return set()
    try:
        ends = consumer.end_offsets(list(owned.values()), timeout_ms=timeout_ms)
        return {p for p, tp in owned.items() if consumer.position(tp, timeout_ms=timeout_ms) >= ends[tp]}
    except KafkaError:
        return None


def broker_answers(consumer: KafkaConsumer, timeout_ms: int = 5000) -> bool | None:
    """Whether a broker answers this consumer now (an end-offsets query of its partitions); None when it owns no
    partition (nothing to ask about). A poll does not tell: while no broker answers it only comes back empty."""
    owned = list(consumer.assignment())
    if not owned:
        return None
    try:
        consumer.end_offsets(owned, timeout_ms=timeout_ms)
    except KafkaError:
        return False
    return True


def topic_partitions(cfg: KafkaConfig, topics: Iterable[str], *, timeout_s: float) -> dict[str, int]:
    """How many partitions each of ``topics`` has (0: the broker does not know it), asked of the brokers with a
    consumer outside any group. TransientError when no broker answers within ``timeout_s``, with the last connection
    error the client met (refused, a TLS handshake, a SASL handshake or authentication)."""
    with connection_errors() as seen:
        try:
            consumer = KafkaConsumer(group_id=None, enable_auto_commit=False, allow_auto_create_topics=False,
                                     bootstrap_timeout_ms=round(timeout_s * 1000),
                                     request_timeout_ms=max(round(timeout_s * 1000), 1000), **client_kwargs(cfg))
            no_topic_creation(consumer)
        except KafkaError as exc:
            raise TransientError(f"{exc}{last_failure(seen, sasl=cfg.security.sasl)}") from exc
    try:
        known = consumer.topics()
        return {t: len(consumer.partitions_for_topic(t) or ()) if t in known else 0 for t in topics}
    finally:
        consumer.close(autocommit=False)


@contextlib.contextmanager
def connection_errors() -> Iterator[list[str]]:
    """The warnings and errors kafka-python's network layer logs meanwhile (connection prefix and backoff note
    dropped), kept here instead of being logged: ``last_failure`` picks the one that explains a failed start."""
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = re.sub(r"^<[^>]*>:\s*", "", record.getMessage())
            seen.append(re.sub(r"\s*\(backoff [^)]*\)$", "", message))

    logger = logging.getLogger("kafka.net")
    handler, level, propagate = Keep(logging.WARNING), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    try:
        yield seen
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def create_topic_command(cfg: KafkaConfig, topic: str, partitions: int = 3) -> str:
    """A ``kafka-topics.sh`` command line that creates ``topic`` on the first configured broker, as an operator can
    copy it (since Kafka 3 the tool needs ``--bootstrap-server``; a secured cluster also needs ``--command-config``)."""
    broker = cfg.bootstrap_servers.split(",")[0].strip()
    return f"kafka-topics.sh --create --topic {topic} --partitions {partitions} --bootstrap-server {broker}"


def auto_creates_topics(cfg: KafkaConfig) -> bool | None:
    """Whether the brokers create a topic on its first use (``auto.create.topics.enable`` of the controller, asked
    with an admin client); None when that cannot be read (no permission to describe configs, an old broker)."""
    try:
        admin = KafkaAdminClient(**client_kwargs(cfg))
    except KafkaError:
        return None
    try:
        broker = str(admin.describe_cluster()["controller_id"])
        resource = ConfigResource(ConfigResourceType.BROKER, broker, configs=["auto.create.topics.enable"])
        found = admin.describe_configs(config_resources=[resource], config_filter="all")
        value = found["broker"][broker]["auto.create.topics.enable"]["value"]
        return str(value).lower() == "true"
    except (KafkaError, KeyError, TypeError, ValueError):
        return None
    finally:
        admin.close()


def permissions(cfg: KafkaConfig, needs: Mapping[str, str], *, timeout_s: float) -> dict[str, bool | None]:
    """Whether the configured principal may do each of ``needs`` (topic -> ``READ`` or ``WRITE``) and ``READ`` on
    ``cfg.group_id``, as the brokers' authorizer reports it, by ``"WRITE on topic X"`` / ``"READ on group G"``: True
    allowed, False refused, None not reported (a topic or group the brokers do not know yet, a broker older than
    Kafka 2.3, no answer within ``timeout_s``). A broker without an authorizer allows everything."""
    answers: dict[str, bool | None] = {f"{op} on topic {topic}": None for topic, op in needs.items()}
    group = f"READ on group {cfg.group_id}"
    answers[group] = None
    ms = max(round(timeout_s * 1000), 1000)
    try:
        admin = KafkaAdminClient(**client_kwargs(cfg), bootstrap_timeout_ms=ms, request_timeout_ms=ms)
    except KafkaError:
        return answers
    try:
        for topic in admin.describe_topics(list(needs)):
            name, error, allowed = topic.get("name"), topic.get("error_code"), topic.get("authorized_operations")
            if name not in needs:
                continue
            if error == TopicAuthorizationFailedError.errno:  # not even DESCRIBE, which READ and WRITE give
                answers[f"{needs[name]} on topic {name}"] = False
            elif error == 0 and allowed:
                answers[f"{needs[name]} on topic {name}"] = needs[name] in allowed
        try:  # a group's operations are reported once it exists (it has members or offsets)
            allowed = admin.describe_groups([cfg.group_id]).get(cfg.group_id, {}).get("authorized_operations")
            if allowed:
                answers[group] = "READ" in allowed
        except GroupAuthorizationFailedError:  # not even DESCRIBE, which READ gives
            answers[group] = False
    except KafkaError:
        pass
    finally:
        admin.close()
    return answers


def last_failure(seen: Sequence[str], *, sasl: bool = False) -> str:
    """``"; last connection error: ..."`` from what ``connection_errors`` kept, or ``""`` when it kept none. A TLS or
    SASL failure (a handshake, authentication) explains more than a refused connection and is preferred: the log is
    the process's, so another client's attempts can be in it too. Two answers get a ``hint``: a frame "length" that
    is the start of a TLS record (a plaintext protocol against a TLS listener), and, with ``sasl`` (a SASL protocol
    is configured), a dropped connection, which is how refused credentials can look (kafka-python 3.0 can drop the
    broker's answer when the broker closes the connection right after it) and also how a TLS listener answers."""
    failures = [m for m in seen if "failed" in m and not m.startswith("Bootstrap failed")]
    security = [m for m in failures if _SECURITY_FAILURE.search(m)]
    chosen = security or failures
    if not chosen:
        return ""
    return f"; last connection error: {chosen[-1]}{hint(chosen[-1], sasl=sasl)}"


def hint(message: str, *, sasl: bool = False) -> str:
    """What a connection error of kafka-python may mean, as ``" (...)"``, or ``""``: a frame "length" that is the
    start of a TLS record (a plaintext protocol against a TLS listener), and, with ``sasl``, a dropped connection,
    which is how refused credentials can look (see ``last_failure``)."""
    frame = re.search(r"Invalid frame length: (\d+)", message)
    if frame and int(frame.group(1)) >> 24 in _TLS_RECORD_TYPES and int(frame.group(1)) >> 16 & 0xFF == 3:
        return " (the broker answered in TLS: set kafka.security.protocol to SSL or SASL_SSL)"
    if sasl and "socket disconnected" in message:
        return (" (a broker that refuses the SASL credentials closes the connection, and so does a TLS listener: "
                "check kafka.security's protocol, sasl_mechanism, sasl_username and sasl_password)")
    return ""


#: The first byte of a TLS record: change_cipher_spec, alert, handshake, application_data (then version 3.x).
_TLS_RECORD_TYPES = frozenset({0x14, 0x15, 0x16, 0x17})

_SECURITY_FAILURE = re.compile(r"sasl|ssl|tls|handshake|authenticat", re.IGNORECASE)


def ensure_topics(cfg: KafkaConfig, topics: Iterable[str], partitions: int = 3) -> None:
    """Create topics that do not exist yet (replication factor 1 is for local brokers; use your ops tooling in prod)."""
    admin = KafkaAdminClient(**client_kwargs(cfg))
    try:
        existing = set(admin.list_topics())
        new = [NewTopic(t, num_partitions=partitions, replication_factor=1) for t in topics if t not in existing]
        if new:
            with contextlib.suppress(TopicAlreadyExistsError):  # another process created it meanwhile
                admin.create_topics(new)
    finally:
        admin.close()


def encode_reading(payload: Mapping[str, object]) -> bytes:
    """Serialise a reading payload as compact JSON."""
    return orjson.dumps(payload)
