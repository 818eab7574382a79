"""The YAML configuration: pydantic models, ``${ENV_VAR}`` interpolation, and ``load_config``.

``load_config(path)`` is called once by the CLI; nothing reads configuration at import time. Any problem raises
``ConfigError`` whose message names the key path (``groups[0].window.stride``) and the reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from sqlalchemy.engine import make_url

from pipeline.cron import CronSchedule
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)
_PERCENT_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]

_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")


def _valid_topic(name: str) -> str:
    """Kafka's rule for topic names: the brokers refuse every record to any other name."""
    if not _TOPIC.fullmatch(name) or name in {".", ".."}:
        raise ValueError("a Kafka topic name is 1 to 249 ASCII letters, digits, '.', '_' and '-' (not '.' or '..')")
    return name


TopicName = Annotated[str, AfterValidator(_valid_topic)]


class _Strict(BaseModel):
    """Base: unknown keys are errors, so a typo in the YAML is reported instead of silently ignored; so are infinite
    and NaN numbers (YAML's ``.inf``/``.nan``), which would train a model that never alarms."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class SecurityConfig(_Strict):
    """Kafka client security. Secrets belong in the environment: ``sasl_password: ${KAFKA_PASSWORD}``."""

    protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_key_password: SecretStr | None = None  # for an encrypted ssl_keyfile

    @property
    def sasl(self) -> bool:
        """Whether the protocol authenticates with SASL (SASL_PLAINTEXT, SASL_SSL)."""
        return self.protocol.startswith("SASL")

    @property
    def tls(self) -> bool:
        """Whether the protocol uses TLS (SSL, SASL_SSL): the ``ssl_*`` files count only then."""
        return self.protocol.endswith("SSL")

    @model_validator(mode="after")
    def _sasl_complete(self) -> SecurityConfig:
        if self.sasl and not (self.sasl_mechanism and self.sasl_username):
            raise ValueError("SASL protocols need sasl_mechanism and sasl_username")
        if self.tls and self.ssl_keyfile and not self.ssl_certfile:
            raise ValueError("ssl_keyfile needs ssl_certfile (the client certificate it is the key of)")
        return self


class KafkaConfig(_Strict):
    """Where readings come from and where rejected messages go."""

    bootstrap_servers: str = "localhost:9092"
    topic: TopicName = "sensor-readings"
    dead_letter_topic: TopicName = "sensor-readings-dlq"
    group_id: str = "sensorwatch"
    client_id: str = "sensorwatch"
    max_poll_records: PositiveInt = 5000
    poll_timeout_ms: PositiveInt = 1000
    max_message_bytes: PositiveInt = 64 * 1024
    session_timeout_ms: Annotated[int, Field(ge=1000)] = 10000  # a crashed consumer's partitions move after this
    security: SecurityConfig = SecurityConfig()

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments shared by every kafka-python client (bootstrap servers and security)."""
        s = self.security
        kwargs: dict[str, Any] = {
            "bootstrap_servers": [h.strip() for h in self.bootstrap_servers.split(",") if h.strip()],
            "client_id": self.client_id,
            "security_protocol": s.protocol,
        }
        if s.sasl_mechanism:
            kwargs["sasl_mechanism"] = s.sasl_mechanism
            kwargs["sasl_plain_username"] = s.sasl_username
            kwargs["sasl_plain_password"] = s.sasl_password.get_secret_value() if s.sasl_password else None
        for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            if getattr(s, key):
                kwargs[key] = getattr(s, key)
        if s.ssl_key_password:
            kwargs["ssl_password"] = s.ssl_key_password.get_secret_value()
        return kwargs


class IngestConfig(_Strict):
    """Input checks beyond the message format. Timestamps more than ``max_future_s`` ahead of the consumer's clock
    are rejected as ``ts_in_future``; more than ``max_age_s`` older than their Kafka record's timestamp (when the
    record was published; the consumer's clock for records without one) as ``ts_too_old``, so a backlog read after
    an outage of the pipeline is not refused for having waited on the broker; a record whose key is not its asset
    id as ``key_mismatch``."""

    max_future_s: PositiveFloat = 300.0
    max_age_s: PositiveFloat | None = None
    require_key_match: bool = True


class MetricsConfig(_Strict):
    """Prometheus metrics and the health probes (``/livez``, ``/readyz``, ``/healthz``) over HTTP; ``port: 0`` picks
    a free port, ``enabled: false`` none. ``unhealthy_after_s``: the started consume loop is hung when it finished
    no iteration for this long."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 9464
    unhealthy_after_s: PositiveFloat = 60.0


class DatabaseConfig(_Strict):
    """SQLAlchemy URL. Never log ``url``; use ``safe_url`` for display. ``postgres://`` and ``postgresql://`` (as
    many platforms hand them out) use the psycopg driver sensorwatch installs (``postgresql+psycopg://``)."""

    url: str = "sqlite:///sensorwatch.db"

    @field_validator("url")
    @classmethod
    def _parsable(cls, value: str) -> str:
        try:
            url = make_url(value)
        except Exception as exc:  # sqlalchemy raises ArgumentError for malformed URLs
            raise ValueError(f"not a valid SQLAlchemy URL ({type(exc).__name__})") from None
        if url.drivername in ("postgres", "postgresql"):
            return url.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
        return value

    @property
    def safe_url(self) -> str:
        """The URL with its password masked (also one given as a ``password`` query parameter)."""
        url = make_url(self.url)
        if "password" in url.query:
            url = url.update_query_dict({"password": "***"})
        return url.render_as_string(hide_password=True)


class SensorConfig(_Strict):
    """One sensor channel of an asset group. Readings outside ``valid_range`` are rejected."""

    name: Annotated[str, Field(min_length=1)]
    unit: str = ""
    valid_range: tuple[float, float] | None = None
    max_gap: Annotated[int, Field(ge=0)] | None = None  # overrides window.max_gap for this sensor

    @field_validator("valid_range")
    @classmethod
    def _ordered(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not value[0] < value[1]:
            raise ValueError("valid_range must be [low, high] with low < high")
        return value


class WindowConfig(_Strict):
    """Sliding windows on the sampling grid, in grid steps.

    Window ``k`` of an asset covers grid slots ``[k*stride, k*stride + length)``; so windows do not depend on when the
    stream started and a replay cuts the same windows. A missing slot is filled with the sensor's previous value when
    the gap is at most ``max_gap`` slots; a window still holding holes is skipped, never scored on invented data.
    A window closes once the asset has reported ``lateness`` slots past its end (with 0: once its last slot has every
    sensor, or a later slot began: per-sensor messages); readings for closed windows are late.
    When an asset stops reporting, its event time is advanced by the wall-clock time elapsed beyond ``idle_close_s``,
    so its open windows still close (and are scored or skipped).
    ``smooth`` (slots, 1 = off): each value of a window is the causal rolling mean of the sensor over the ``smooth``
    slots ending at it (of the values present, after gap filling): noisy or quantised sensors then show level shifts
    as shifts rather than as noise. Training windows are cut the same way.
    """

    length: Annotated[int, Field(ge=2)] = 30
    stride: PositiveInt = 5
    max_gap: Annotated[int, Field(ge=0)] = 3
    lateness: Annotated[int, Field(ge=0)] = 0
    idle_close_s: PositiveFloat = 120.0
    smooth: Annotated[int, Field(ge=1, le=1000)] = 1

    @model_validator(mode="after")
    def _stride_fits(self) -> WindowConfig:
        if self.stride > self.length:
            raise ValueError("stride must not exceed length (readings between windows would never be scored)")
        return self


_SHAPE_KEYS = ("hidden", "lstm_hidden", "lstm_layers", "code_size", "conv_channels", "kernel_size", "beta")
_SHAPE_KEYS_OF: dict[str, tuple[str, ...]] = {  # per model type, the shape keys it reads (others: "hidden")
    "lstm": ("lstm_hidden", "lstm_layers", "code_size"), "conv": ("conv_channels", "kernel_size"),
    "vae": ("hidden", "beta"),
}


class ModelConfig(_Strict):
    """Autoencoder type, its hyperparameters, and training settings.

    ``type``: ``dense`` (flattened window; ``hidden`` layer sizes, the last is the code), ``lstm`` (encoder-decoder;
    ``lstm_hidden``, ``lstm_layers``, ``code_size``), ``conv`` (1-D convolutions over time; ``conv_channels``,
    ``kernel_size``), ``sparse`` / ``contractive`` (dense with a code penalty), ``vae`` (dense variational; ``beta``).
    Options for every type: ``noise_std`` (denoising: Gaussian input corruption while training), ``sparsity_weight``
    with ``sparsity`` l1|kl and ``sparsity_target``, ``contractive_weight``. Unset penalties use the type's default.

    Scaling: each sensor is standardised by its training mean and std, but the std is at least
    ``scale_floor_step`` x its quantisation step (the median gap between the values of a sensor that takes few
    distinct values, as the model sees them: after ``window.smooth``), so a meter toggling between two integers does
    not turn one step into many deviations; and, opt-in, at least ``scale_floor_level`` x the sensor's median |level|
    (e.g. 0.002: changes under 0.2% of the level are not anomalies; this depends on where the unit puts zero, so set
    it only for sensors measured from a true zero). A sensor that never moved in training gets std 1 (or its floor).

    Scoring: ``score_steps`` (opt-in, window.stride..window.length) scores each window by the reconstruction error
    of its last ``score_steps`` steps only; the network still sees the whole window, and the threshold is fitted on
    the same score. Rows from before a change stop counting sooner, so alarms clear sooner after a fault ends (a
    noisier score may also miss a little more). Unset: the whole window counts. A change takes effect with the next
    trained model (a model keeps the score its threshold was fitted on).
    """

    type: Literal["dense", "lstm", "conv", "sparse", "contractive", "vae"] = "dense"
    hidden: Annotated[list[PositiveInt], Field(min_length=1)] = Field(default_factory=lambda: [64, 16])
    lstm_hidden: PositiveInt = 32
    lstm_layers: PositiveInt = 1
    code_size: PositiveInt = 16
    conv_channels: Annotated[list[PositiveInt], Field(min_length=1)] = Field(default_factory=lambda: [32, 16])
    kernel_size: PositiveInt = 7
    noise_std: Annotated[float, Field(ge=0)] = 0.0
    sparsity: Literal["l1", "kl"] = "l1"
    sparsity_weight: Annotated[float, Field(ge=0)] | None = None
    sparsity_target: Annotated[float, Field(gt=0, lt=1)] = 0.05
    contractive_weight: Annotated[float, Field(ge=0)] | None = None
    beta: Annotated[float, Field(ge=0)] = 1.0
    epochs: PositiveInt = 40
    batch_size: PositiveInt = 128
    learning_rate: PositiveFloat = 1e-3
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    validation_fraction: Annotated[float, Field(gt=0, lt=0.9)] = 0.2
    patience: PositiveInt = 6
    seed: int = 0
    scale_floor_level: Annotated[float, Field(ge=0, lt=1)] = 0.0
    scale_floor_step: Annotated[float, Field(ge=0)] = 0.5
    score_steps: PositiveInt | None = None

    @field_validator("kernel_size")
    @classmethod
    def _odd_kernel(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError("kernel_size must be odd")
        return value

    def idle_keys(self) -> list[str]:
        """Keys that change nothing but the config hash, each in words: shape keys the chosen type does not use,
        and penalty options whose weight is 0 (the group warns of them, naming itself)."""
        unused = sorted(set(_SHAPE_KEYS) & self.model_fields_set - set(_SHAPE_KEYS_OF.get(self.type, ("hidden",))))
        problems = []
        if unused:
            problems.append(f"{', '.join(unused)} not used by type {self.type} (it uses "
                            f"{', '.join(_SHAPE_KEYS_OF.get(self.type, ('hidden',)))})")
        return problems + self._idle_penalty_options()

    def _idle_penalty_options(self) -> list[str]:
        """Penalty options that have no effect as written (each in words)."""
        set_keys = self.model_fields_set
        sparse_off = self.sparsity_weight == 0 or (self.sparsity_weight is None and self.type != "sparse")
        problems = []
        if sparse_off and {"sparsity", "sparsity_target"} & set_keys:
            named = ", ".join(sorted({"sparsity", "sparsity_target"} & set_keys))
            problems.append(f"{named} has no effect without sparsity_weight > 0 (type {self.type}"
                            f"{'' if self.sparsity_weight is None else ', sparsity_weight 0'})")
        elif self.sparsity == "l1" and "sparsity_target" in set_keys:
            problems.append("sparsity_target is used by sparsity: kl only (sparsity is l1)")
        if self.type == "sparse" and self.sparsity_weight == 0:
            problems.append("type sparse with sparsity_weight 0 trains a plain dense autoencoder")
        if self.type == "contractive" and self.contractive_weight == 0:
            problems.append("type contractive with contractive_weight 0 trains a plain dense autoencoder")
        return problems

    def hyperparameters(self) -> dict[str, Any]:
        """The constructor arguments of ``models.autoencoders.build_model`` for this type (stored in bundles)."""
        shape: dict[str, Any] = {
            "lstm": {"lstm_hidden": self.lstm_hidden, "lstm_layers": self.lstm_layers, "code_size": self.code_size},
            "conv": {"conv_channels": list(self.conv_channels), "kernel_size": self.kernel_size},
            "vae": {"hidden": list(self.hidden), "beta": self.beta},
        }.get(self.type, {"hidden": list(self.hidden)})
        options: dict[str, Any] = {"noise_std": self.noise_std, "sparsity": self.sparsity,
                                   "sparsity_target": self.sparsity_target}
        if self.sparsity_weight is not None:
            options["sparsity_weight"] = self.sparsity_weight
        if self.contractive_weight is not None:
            options["contractive_weight"] = self.contractive_weight
        return {**shape, **options}


class ThresholdConfig(_Strict):
    """How the alert threshold is set from validation errors, without labels.

    ``percentile``: the given percentile of validation window scores, times ``multiplier``.
    ``mean_std``: mean + ``k`` standard deviations of validation window scores, times ``multiplier``.
    ``pot``: peaks over threshold: a generalised Pareto tail fitted above the ``tail_quantile`` of validation scores,
    the score exceeded at ``target_rate`` (false alarms per window), times ``multiplier``.

    ``ewma_alpha`` (optional, in (0, 1]): the threshold applies to an exponentially weighted moving average of each
    asset's window scores, ``alpha * score + (1 - alpha) * previous``, instead of the raw scores; it is fitted on the
    validation scores smoothed the same way, per asset (leaving out each stream's first ``3 / alpha`` windows, whose
    level still leans on where the stream started). Smaller alpha smooths more: fewer one-window false alarms,
    slower to react. The pipeline keeps the smoothed stream across batches and restarts (``smoothed_score``). A model
    carries the alpha it was trained with, so a change takes effect with the next trained model.
    """

    method: Literal["percentile", "mean_std", "pot"] = "percentile"
    percentile: Annotated[float, Field(gt=50, lt=100)] = 99.5
    k: PositiveFloat = 4.0
    target_rate: Annotated[float, Field(gt=0, lt=0.5)] = 1e-3
    tail_quantile: Annotated[float, Field(ge=0.5, lt=1)] = 0.98
    multiplier: PositiveFloat = 1.0
    ewma_alpha: Annotated[float, Field(gt=0, le=1)] | None = None

    def fit_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``models.thresholds.fit_threshold`` (all but the method and the smoothing, which
        ``pipeline.train`` applies per asset)."""
        return self.model_dump(exclude={"method", "ewma_alpha"})


class SeverityTier(_Strict):
    """A severity level: an alert takes the highest tier whose ``multiple`` x threshold one of its windows reached."""

    name: Annotated[str, Field(min_length=1, max_length=20, pattern=r"^[A-Za-z0-9_.-]+$")]
    multiple: Annotated[float, Field(ge=1)]


class MaintenanceWindow(_Strict):
    """A span during which assets raise nothing: explicit ``start``/``end`` (UTC; naive times are UTC) or a ``cron``
    schedule (5 fields, UTC) with ``duration_minutes``. ``assets`` limits it to some of the group's assets."""

    assets: list[str] | None = None
    start: datetime | None = None
    end: datetime | None = None
    cron: str | None = None
    duration_minutes: PositiveInt | None = None
    reason: str = ""

    @field_validator("start", "end")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    @model_validator(mode="after")
    def _one_form(self) -> MaintenanceWindow:
        explicit = self.start is not None or self.end is not None
        scheduled = self.cron is not None or self.duration_minutes is not None
        if explicit == scheduled:
            raise ValueError("give either start and end, or cron and duration_minutes")
        if explicit and (self.start is None or self.end is None or self.end <= self.start):
            raise ValueError("start and end are both required, with end after start")
        if scheduled:
            if self.cron is None or self.duration_minutes is None:
                raise ValueError("cron and duration_minutes are both required")
            CronSchedule.parse(self.cron)  # ValueError names the field at fault
        return self


class AftermathConfig(_Strict):
    """After an incident that reached a large multiple of the threshold, hold the asset's windows to a raised bar for
    a while, so the plant settling into a slightly different state does not keep (or re-open) the alarm.

    A window counts as exceeding only when its level is above both the threshold and ``relative`` x the peak ratio
    (level / threshold) of the asset's incident windows so far, each halving every ``half_life_s`` of event time.
    Windows count from their incident's opening on; a lone spike that opens no incident raises nothing. Ratios count
    up to ``top / relative`` (top: the highest severity tier's multiple), so the bar is at most ``top``, a level above
    it always counts, and a level L is held back for at most ``half_life_s`` x log2(top / L) after the incident's last
    window."""

    relative: Annotated[float, Field(gt=0, lt=1)] = 0.3
    half_life_s: PositiveFloat = 21600.0


class AlertConfig(_Strict):
    """Alert rule of a group (all times are event time, from window ends).

    Open when ``k`` of the last ``n`` windows exceed the threshold and that has held for ``min_duration_s``; resolve
    after ``clear_after`` consecutive windows at or below ``exit_level`` x threshold (hysteresis; a window between the
    exit level and the threshold keeps the alert open). After a resolution the asset opens nothing for ``cooldown_s``.
    Severity: the highest of ``severities`` reached (default: warning at 1x, critical at ``critical_multiplier`` x);
    it only rises during an incident. Windows overlapping a ``maintenance`` window are ignored. ``aftermath``
    (optional) raises the bar after a large incident (``AftermathConfig``); "the threshold" above then means the
    raised bar, for opening and for the exit level alike."""

    k: PositiveInt = 2
    n: PositiveInt = 3
    clear_after: PositiveInt = 3
    critical_multiplier: Annotated[float, Field(gt=1)] = 3.0
    top_sensors: PositiveInt = 3
    severities: list[SeverityTier] | None = None
    exit_level: Annotated[float, Field(gt=0, le=1)] = 1.0
    min_duration_s: Annotated[float, Field(ge=0)] = 0.0
    cooldown_s: Annotated[float, Field(ge=0)] = 0.0
    maintenance: list[MaintenanceWindow] = Field(default_factory=list)
    aftermath: AftermathConfig | None = None

    @model_validator(mode="after")
    def _k_within_n(self) -> AlertConfig:
        if self.k > self.n:
            raise ValueError("k must not exceed n")
        if self.severities is not None:
            if "critical_multiplier" in self.model_fields_set:
                raise ValueError("give either severities or critical_multiplier, not both")
            if not self.severities or self.severities[0].multiple != 1:
                raise ValueError("severities must start with a tier at multiple 1 (the severity an alert opens with)")
            multiples = [t.multiple for t in self.severities]
            if multiples != sorted(set(multiples)):
                raise ValueError("severities must have strictly increasing multiples")
            names = [t.name for t in self.severities]
            if len(set(names)) != len(names):
                raise ValueError("severity names must be unique")
        if self.aftermath is not None and self.tiers[-1].multiple <= 1:
            raise ValueError("aftermath needs a severity tier above 1x: its raised bar never exceeds the top tier")
        return self

    @property
    def tiers(self) -> list[SeverityTier]:
        """The severity tiers in rising order."""
        if self.severities is not None:
            return list(self.severities)
        return [SeverityTier(name="warning", multiple=1.0),
                SeverityTier(name="critical", multiple=self.critical_multiplier)]


SinkEvent = Literal["opened", "updated", "escalated", "resolved"]


class _OutboxSink(_Strict):
    """What every sink shares: events wait in the database outbox until delivered, for at most ``max_age_h`` hours
    (then they are marked failed; ``sensorwatch sinks retry`` queues them again). ``queue_size`` is accepted from
    older configurations and ignored, with a warning: the outbox has no in-memory queue."""

    max_age_h: PositiveFloat = 24.0
    queue_size: PositiveInt | None = None

    @model_validator(mode="after")
    def _queue_size_is_gone(self) -> _OutboxSink:
        if self.queue_size is not None:
            log.warning("sinks: queue_size is no longer used (alert events wait in the database outbox); remove it")
        return self


class KafkaSinkConfig(_OutboxSink):
    """Alert events as JSON on a Kafka topic of the ``kafka`` cluster (same security), keyed by asset.

    ``events`` filters kinds; ``escalated`` selects the updates that raised the severity."""

    enabled: bool = True
    topic: TopicName = "sensor-alerts"
    events: list[SinkEvent] = Field(default_factory=lambda: ["opened", "updated", "resolved"])
    timeout_s: PositiveFloat = 10.0


_CONTROL_CHARS = r"\x00-\x1f\x7f"  # no name, URL or header value holds one (a secret file's newline, a terminal escape)
_CONTROL = re.compile(f"[{_CONTROL_CHARS}]")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token


class WebhookSinkConfig(_OutboxSink):
    """Alert events POSTed as JSON to ``url``; a try (connecting, sending, the whole answer) lasts at most
    ``timeout_s``; failures are retried ``retries`` times at once with doubling backoff from ``backoff_s``, then later
    from the outbox. Header values are secrets: use ``${ENV_VAR}``. ``url`` is required while ``enabled``."""

    enabled: bool = True
    url: Annotated[str, Field(pattern=r"^https?://\S+$")] | None = None
    headers: dict[str, SecretStr] = Field(default_factory=dict)
    events: list[SinkEvent] = Field(default_factory=lambda: ["opened", "escalated", "resolved"])
    timeout_s: PositiveFloat = 5.0
    retries: Annotated[int, Field(ge=0)] = 3
    backoff_s: PositiveFloat = 1.0

    @model_validator(mode="after")
    def _url_when_enabled(self) -> WebhookSinkConfig:
        if self.enabled and self.url is None:
            raise ValueError("url is required while the webhook is enabled (or set enabled: false)")
        return self

    @field_validator("url")
    @classmethod
    def _usable_url(cls, value: str | None) -> str | None:
        """A URL the HTTP client can send to; the error never repeats it (webhook URLs often carry a token)."""
        if value is None:
            return value
        if _CONTROL.search(value):
            raise ValueError("url contains a control character (a trailing newline from a secret file?)")
        try:
            parts = urlsplit(value)
            host, _port = parts.hostname, parts.port  # .port raises for a port that is not a number
        except ValueError as exc:
            reason = re.sub(r"'.*'", "...", str(exc).split(":")[0])  # quoted parts repeat the URL
            raise ValueError(f"url is not a valid URL ({reason})") from None
        if not host:
            raise ValueError("url has no host name")
        if parts.username is not None or parts.password is not None:
            raise ValueError("url holds a user name or password: the HTTP client does not send them; put the "
                             "credentials in headers (Authorization: ${ENV_VAR})")
        return value

    @field_validator("headers")
    @classmethod
    def _sendable_headers(cls, value: dict[str, SecretStr]) -> dict[str, SecretStr]:
        """Header names are HTTP tokens and values hold no control characters; an error names the header, never its
        value (a secret)."""
        for name, secret in value.items():
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"header name {name[:60]!r} is not a valid HTTP header name")
            if _CONTROL.search(secret.get_secret_value().replace("\t", " ")):
                raise ValueError(f"header {name} contains a control character (a trailing newline from a secret "
                                 "file?)")
        return value

    @model_validator(mode="after")
    def _secrets_over_plain_http(self) -> WebhookSinkConfig:
        if self.enabled and self.headers and self.url is not None and self.url.lower().startswith("http://"):
            log.warning("sinks.webhook: headers (%s) are sent over plain http to %s: use https where they are "
                        "secrets", ", ".join(sorted(self.headers)), urlsplit(self.url).hostname)
        return self


class SinksConfig(_Strict):
    """Where alert events go besides the database (which always has them): delivered at least once from the
    database outbox. Sinks never block the pipeline."""

    kafka: KafkaSinkConfig | None = None
    webhook: WebhookSinkConfig | None = None


def _valid_cron(value: str) -> str:
    CronSchedule.parse(value)  # ValueError names the field at fault
    return value


def _valid_zone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {value!r} (use an IANA name such as Europe/Berlin)") from None
    return value


CronExpression = Annotated[str, AfterValidator(_valid_cron)]
TimeZoneName = Annotated[str, AfterValidator(_valid_zone)]


class RetentionConfig(_Strict):
    """How long the database keeps history (``sensorwatch db prune`` prunes now; ``sensorwatch scheduler`` on
    ``cron``, read in ``timezone``).

    Window scores and skipped windows that ended more than ``scores_days`` ago are deleted, except what a restarted
    pipeline rebuilds an asset's state from (its latest windows, and those its aftermath rule still looks back on).
    Resolved alerts closed more than ``alerts_days`` ago are deleted (None: alerts are kept); open alerts never are.
    Rows go in batches of ``batch_rows``, one short transaction each, so running pipelines are not held up.
    ``scores_days`` must exceed ``retrain.lookback_days`` (the retrain leaves out the windows its lookback scored
    anomalous), and ``alerts_days`` must be at least ``scores_days`` (the alerts over stored windows are read with
    them). Model bundles: per group, the active model's, the newest ``model_bundles`` retired versions' (what
    ``models activate`` rolls back to), the newest ``model_bundles`` rejected or failed candidates' and the newest
    ``model_bundles`` undecided ones' (``train --no-activate``; a day old) are kept; older ones are deleted from
    ``model_dir`` and their registry rows marked (None: every bundle is kept)."""

    enabled: bool = True
    scores_days: PositiveFloat = 90.0
    alerts_days: PositiveFloat | None = None
    model_bundles: PositiveInt | None = 10
    cron: CronExpression = "30 3 * * *"
    timezone: TimeZoneName = "UTC"
    batch_rows: Annotated[int, Field(ge=100, le=100_000)] = 5000


    @model_validator(mode="after")
    def _alerts_outlive_scores(self) -> RetentionConfig:
        if self.alerts_days is not None and self.alerts_days < self.scores_days:
            raise ValueError(f"alerts_days ({self.alerts_days:g}) must be at least scores_days "
                             f"({self.scores_days:g}): the alerts over stored windows are read with them")
        return self


class RetrainConfig(_Strict):
    """Retraining on recent normal data (``sensorwatch scheduler`` runs it on ``cron``; ``sensorwatch retrain`` now).

    Reads the last ``lookback_days`` back from Kafka (by record timestamp), cuts windows as the pipeline does, drops
    windows overlapping an alert (widened by ``alert_margin_s``) or scored above threshold, holds out the newest
    ``holdout_fraction`` and trains a candidate on the rest (starting from the active model's weights when
    ``warm_start``; ``epochs`` overrides the group's training epochs). Skipped when fewer than ``min_windows`` remain.
    The candidate is promoted only if its false-alarm rate on the held-out windows is at most the active model's plus
    ``tolerance``, it flags the alert windows at least as often as the active model minus ``tolerance``, it flags
    synthetic faults (a 3-sigma step on one sensor of held-out windows) at most 10 points less often (not measured for
    drift-following groups), and at most ``max_anomalous_fraction`` of the recent windows were anomalous. With no
    active model to compare with (none, or one that cannot serve this configuration), its false-alarm rate may exceed
    the rate its threshold is fitted for by ``tolerance`` at most. About
    ``max_windows`` windows per group are held in memory at most: when the lookback holds more, only every k-th block
    of consecutive windows of each asset is kept (k doubling until they fit), plus every window near an alert;
    smoothed scores are computed per block (``pipeline.thinning``). ``max_windows`` must leave room for twice
    ``min_windows`` after the holdout. ``cron`` has five fields (or a macro such as ``@daily``) read in
    ``timezone``; a run missed by more than ``misfire_grace_time_s`` is dropped, several missed runs are run once when
    ``coalesce``. A retrain holds a per-group database lock that expires after ``lock_ttl_s``.
    Running pipelines check for a newly active model every ``reload_interval_s``.
    """

    enabled: bool = True
    cron: CronExpression = "0 2 * * *"
    timezone: TimeZoneName = "UTC"
    lookback_days: PositiveFloat = 7.0
    min_windows: Annotated[int, Field(ge=32)] = 500
    max_windows: Annotated[int, Field(ge=1000)] = 200_000
    alert_margin_s: Annotated[float, Field(ge=0)] = 600.0
    holdout_fraction: Annotated[float, Field(gt=0, le=0.5)] = 0.2
    tolerance: Annotated[float, Field(ge=0, lt=1)] = 0.02
    max_anomalous_fraction: Annotated[float, Field(gt=0, le=1)] = 0.5
    warm_start: bool = True
    epochs: PositiveInt | None = None
    misfire_grace_time_s: PositiveInt = 3600
    coalesce: bool = True
    lock_ttl_s: PositiveFloat = 6 * 3600.0
    read_timeout_s: PositiveFloat = 600.0
    reload_interval_s: PositiveFloat = 30.0

    @model_validator(mode="after")
    def _window_bounds(self) -> RetrainConfig:
        least = math.ceil(round(2 * self.min_windows / (1 - self.holdout_fraction), 6))
        if self.max_windows < least:
            raise ValueError(f"max_windows ({self.max_windows}) must be at least {least}: after the holdout "
                             f"({self.holdout_fraction:g}) it must leave room for twice min_windows "
                             f"({self.min_windows})")
        return self



class DriftConfig(_Strict):
    """Follow slow drift of normal operation: what the model persistently fails to explain about an asset in quiet
    times stops counting as error.

    Per asset and sensor, an offset of the model's residual (reading minus reconstruction, standardised) starts at 0;
    errors are taken relative to it. After each window that leaves the asset quiet (score and level at or below the
    threshold, no open alert, no exceeding window in the k-of-n history, outside maintenance) it moves towards the
    window's mean residual by ``stride time / span_s`` of the distance: an exponential average over about ``span_s``
    of scored windows. A fault that builds up more slowly than ``span_s``, below the threshold all along, is absorbed
    as drift: leave this off for assets whose faults are slow drifts (fouling, wear), or make ``span_s`` much longer,
    or bound what can be absorbed with ``max_offset``: each offset stays within +-``max_offset`` (standard deviations
    of the model's scaler), so a slow fault that grows beyond that counts again."""

    span_s: PositiveFloat
    max_offset: PositiveFloat | None = None


AssetName = Annotated[str, Field(min_length=1, max_length=120, pattern=f"^[^{_CONTROL_CHARS}]+$")]  # tables' width


class GroupConfig(_Strict):
    """Assets that share sensors, a sampling grid, a window shape, a model and an alert rule."""

    # a directory under model_dir and the prefix of model versions (80 characters in the registry): no "." or ".."
    name: Annotated[str, Field(min_length=1, max_length=61, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")]
    assets: Annotated[list[AssetName], Field(min_length=1)]
    sampling_period_s: PositiveFloat = 1.0
    sensors: Annotated[list[SensorConfig], Field(min_length=1)]
    window: WindowConfig = WindowConfig()
    model: ModelConfig = ModelConfig()
    threshold: ThresholdConfig = ThresholdConfig()
    alert: AlertConfig = AlertConfig()
    drift: DriftConfig | None = None

    @model_validator(mode="after")
    def _unique_names(self) -> GroupConfig:
        for label, names in (("sensors", [s.name for s in self.sensors]), ("assets", self.assets)):
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"duplicate {label}: {', '.join(dupes)}")
        return self

    @model_validator(mode="after")
    def _score_steps_within_window(self) -> GroupConfig:
        steps = self.model.score_steps
        if steps is not None and steps > self.window.length:
            raise ValueError(f"model.score_steps ({steps}) must not exceed window.length ({self.window.length})")
        if steps is not None and steps < self.window.stride:
            raise ValueError(f"model.score_steps ({steps}) must be at least window.stride ({self.window.stride}), or "
                             "the readings between scored steps would never count")
        return self

    @model_validator(mode="after")
    def _model_warnings(self) -> GroupConfig:
        """Warnings, naming the group, for model keys that change nothing (``ModelConfig.idle_keys``) and for
        shapes that train but cannot work well: a convolution wider than the window, or a dense or variational
        network with no layer narrower than the window's inputs (no bottleneck: it can copy anomalies through;
        sparse and contractive networks may be wide on purpose, their penalty restricts them)."""
        m, length = self.model, self.window.length
        for problem in m.idle_keys():
            log.warning("group %s: model: %s", self.name, problem)
        if m.type == "conv" and m.kernel_size > length:
            log.warning("group %s: model.kernel_size %d is wider than window.length %d: most of each convolution "
                        "sees padding", self.name, m.kernel_size, length)
        inputs = length * len(self.sensors)
        if m.type in ("dense", "vae") and min(m.hidden) >= inputs:
            log.warning("group %s: no layer of model.hidden %s is narrower than a window's %d values: no "
                        "bottleneck, so anomalies may be reconstructed as well as normal windows", self.name,
                        list(m.hidden), inputs)
        return self

    @property
    def sensor_names(self) -> list[str]:
        """Sensor names in configured order: the model's feature order."""
        return [s.name for s in self.sensors]

    def max_gaps(self) -> list[int]:
        """Fill limit per sensor, in configured order (the sensor's own, else the window's)."""
        return [self.window.max_gap if s.max_gap is None else s.max_gap for s in self.sensors]

    @property
    def period_ms(self) -> int:
        """The sampling grid step in milliseconds."""
        return round(self.sampling_period_s * 1000)

    @property
    def drift_limit(self) -> float | None:
        """The bound on each drift offset (``DriftConfig.max_offset``); None: unbounded, or no drift following."""
        return None if self.drift is None else self.drift.max_offset

    @property
    def drift_weight(self) -> float | None:
        """How far the drift offsets move towards a normal window's mean residuals (``DriftConfig``); None: no drift."""
        if self.drift is None:
            return None
        return min(1.0, self.window.stride * self.sampling_period_s / self.drift.span_s)

    def model_hash(self) -> str:
        """Hash of everything a trained model depends on (sensors, grid, window, model, threshold)."""
        relevant = self.model_dump(include={"sensors", "sampling_period_s", "window", "model", "threshold"})
        if relevant["model"]["score_steps"] is None:  # unset: the hash of models trained before the option existed
            del relevant["model"]["score_steps"]
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


class Config(_Strict):
    """The whole configuration file."""

    kafka: KafkaConfig = KafkaConfig()
    database: DatabaseConfig = DatabaseConfig()
    ingest: IngestConfig = IngestConfig()
    metrics: MetricsConfig = MetricsConfig()
    model_dir: Path = Path("model-store")
    groups: Annotated[list[GroupConfig], Field(min_length=1)]
    sinks: SinksConfig = SinksConfig()
    retrain: RetrainConfig = RetrainConfig()
    retention: RetentionConfig = RetentionConfig()

    @model_validator(mode="before")
    @classmethod
    def _default_retention_covers_the_retrain(cls, data: Any) -> Any:
        """The default ``retention.scores_days`` (90) must not refuse a configuration written before retention
        existed: with a retrain lookback of 90 days or more, an enabled retention that does not set ``scores_days``
        keeps twice the lookback (no more than its ``alerts_days``)."""
        if not isinstance(data, dict) or not isinstance(data.get("retrain"), dict):
            return data
        retention = data.get("retention", {})
        if not isinstance(retention, dict) or "scores_days" in retention or retention.get("enabled") is False:
            return data
        try:
            lookback = float(data["retrain"].get("lookback_days", 0))
            alerts = float(retention["alerts_days"]) if retention.get("alerts_days") is not None else math.inf
        except (TypeError, ValueError):  # not numbers: the fields' own validation says so
            return data
        if lookback < 90:
            return data
        return {**data, "retention": {**retention, "scores_days": min(2 * lookback, max(alerts, lookback + 1))}}

    @model_validator(mode="after")
    def _retention_covers_the_retrain(self) -> Config:
        if self.retention.enabled and self.retention.scores_days <= self.retrain.lookback_days:
            raise ValueError(f"retention.scores_days ({self.retention.scores_days:g}) must be more than "
                             f"retrain.lookback_days ({self.retrain.lookback_days:g}): the retrain leaves out the "
                             "windows its lookback scored anomalous, so it needs their scores")
        return self

    @model_validator(mode="after")
    def _topics_apart(self) -> Config:
        if self.kafka.dead_letter_topic == self.kafka.topic:
            raise ValueError("kafka.dead_letter_topic must not be kafka.topic: rejected readings would be read again")
        alerts = self.sinks.kafka
        if alerts is not None and alerts.enabled and alerts.topic in {self.kafka.topic, self.kafka.dead_letter_topic}:
            raise ValueError("sinks.kafka.topic must be a topic of its own, not kafka.topic or kafka.dead_letter_topic")
        return self

    @model_validator(mode="after")
    def _assets_in_one_group(self) -> Config:
        seen: dict[str, str] = {}
        names = [g.name for g in self.groups]
        if len(set(names)) != len(names):
            raise ValueError("group names must be unique")
        for group in self.groups:
            for asset in group.assets:
                if asset in seen:
                    raise ValueError(f"asset {asset!r} is in groups {seen[asset]!r} and {group.name!r}")
                seen[asset] = group.name
        return self

    def group(self, name: str) -> GroupConfig:
        """The group called ``name``; ConfigError if there is none."""
        for group in self.groups:
            if group.name == name:
                return group
        raise ConfigError(f"groups: no group named {name!r} (have: {', '.join(g.name for g in self.groups)})")

    def asset_groups(self) -> dict[str, GroupConfig]:
        """Map of asset id to its group."""
        return {asset: group for group in self.groups for asset in group.assets}


def interpolate_env(node: Any, env: Mapping[str, str], path: str = "") -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in every string of a parsed YAML tree.

    Raises ConfigError naming the key path when a variable without default is not set or empty.
    """
    if isinstance(node, dict):
        return {k: interpolate_env(v, env, f"{path}.{k}" if path else str(k)) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate_env(v, env, f"{path}[{i}]") for i, v in enumerate(node)]
    if not isinstance(node, str):
        return node

    password_span = _password_span(node) if path == "database.url" else (-1, -1)

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env and env[name] != "":
            value = env[name]
        elif default is not None:
            value = default
        else:
            state = "is empty" if name in env else "is not set"
            raise ConfigError(f"{path or '<root>'}: environment variable {name} {state} and has no default")
        if not password_span[0] <= match.start() < password_span[1]:
            return value
        # a password with '@', ':' or '/' would break the URL (and show up in the error): encode it in place
        if _PERCENT_ESCAPE.search(value):
            log.warning("%s: the value of %s looks percent-encoded; it is encoded again here (give the password as "
                        "it is)", path, name)
        return quote(value, safe="")

    return _ENV_PATTERN.sub(substitute, node)


def _password_span(url: str) -> tuple[int, int]:
    """Where the password of a URL template (``scheme://user:password@host/...``) lies: from after the first ``:`` of
    its ``user:password`` part to its ``@``; ``(-1, -1)`` when it has none (a placeholder for the whole
    ``user:password`` part is then taken as it is)."""
    scheme = re.match(r"[A-Za-z][A-Za-z0-9+.\-]*://", url)
    if scheme is None:
        return -1, -1
    slash = url.find("/", scheme.end())
    at = url.rfind("@", scheme.end(), len(url) if slash < 0 else slash)
    colon = url.find(":", scheme.end(), at) if at >= 0 else -1
    return (colon + 1, at) if colon >= 0 else (-1, -1)


def _format_location(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


def parse_config(raw: Any, env: Mapping[str, str] | None = None) -> Config:
    """Validate an already-parsed YAML tree. ConfigError lists every problem as ``key.path: reason``."""
    if not isinstance(raw, dict):
        raise ConfigError("<root>: the configuration must be a mapping")
    data = interpolate_env(raw, os.environ if env is None else env)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        problems = [f"{_format_location(e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems)) from None


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    """Read, interpolate and validate a YAML configuration file (``yaml.safe_load`` only)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_config(raw, env)
