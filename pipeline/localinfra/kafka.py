"""A real single-node Apache Kafka broker (KRaft, broker+controller in one JVM) as a child process.

The broker's jars come from Maven Central through docker/kafka/pom.xml and are cached once under
~/.cache/sensorwatch/kafka-<version>/libs. Each LocalKafka gets its own temp dir, free ports and
cluster id, so several can run side by side. Needs `java` (17+) and, for the first download, `mvn`.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import ctypes
import fcntl
import hashlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from pipeline.localinfra._util import (
    REPO_ROOT,
    LocalInfraError,
    cache_root,
    deadline,
    free_port,
    port_open,
    tail,
)
from pipeline.localinfra.tls import Pki, make_pki

#: The local-broker kit: pom.xml (jar list), server.properties (template), log4j2.xml.
KIT_DIR = REPO_ROOT / "docker" / "kafka"

_POM_NS = {"m": "http://maven.apache.org/POM/4.0.0"}

#: The client user of a ``secure=True`` broker's SASL listeners (PLAIN and both SCRAM mechanisms).
SASL_USER = "sensorwatch"
#: The extra listeners of a ``secure=True`` broker, by security protocol.
SECURE_PROTOCOLS = ("SSL", "SASL_PLAINTEXT", "SASL_SSL")


def _kit_dir(kit_dir: Path | None) -> Path:
    kit = kit_dir or KIT_DIR
    if not (kit / "pom.xml").is_file():
        raise LocalInfraError(
            f"local Kafka kit not found at {kit} (pom.xml missing); LocalKafka needs a source checkout"
        )
    return kit


def kafka_version(kit_dir: Path | None = None) -> str:
    """Kafka version pinned by the kit's pom.xml (property kafka.version)."""
    pom = _kit_dir(kit_dir) / "pom.xml"
    node = ET.parse(pom).getroot().find("m:properties/m:kafka.version", _POM_NS)
    if node is None or not (node.text or "").strip():
        raise LocalInfraError(f"{pom} has no <properties><kafka.version>")
    return (node.text or "").strip()


def default_jars_dir(kit_dir: Path | None = None) -> Path:
    """Where the broker's jars are cached: <cache>/kafka-<version>/libs."""
    return cache_root() / f"kafka-{kafka_version(kit_dir)}" / "libs"


def ensure_jars(*, kit_dir: Path | None = None, jars_dir: Path | None = None) -> Path:
    """Make sure the broker's runtime jars are in jars_dir (default: the cache) and return it.

    Downloads with Maven only when the folder is missing or was filled from a different pom.xml.
    The download goes to a temp folder that is renamed into place, under a file lock, so an
    interrupted or concurrent run never leaves a half-filled folder behind.
    """
    kit = _kit_dir(kit_dir)
    dest = jars_dir or default_jars_dir(kit)
    pom_hash = hashlib.sha256((kit / "pom.xml").read_bytes()).hexdigest()
    marker = dest / ".pom-sha256"

    def complete() -> bool:
        return any(dest.glob("kafka_2.13-*.jar")) and marker.is_file() and marker.read_text().strip() == pom_hash

    if complete():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if complete():  # another process finished while we waited
            return dest
        mvn = shutil.which("mvn")
        if mvn is None:
            raise LocalInfraError(
                "Apache Maven (mvn) is needed once to fetch the Kafka jars; install it "
                "(Debian: apt-get install maven) or run `make system-deps`"
            )
        tmp = Path(tempfile.mkdtemp(prefix=".libs-", dir=dest.parent))
        try:
            cmd = [
                mvn,
                "-B",
                "-q",
                "-f",
                str(kit / "pom.xml"),
                "dependency:copy-dependencies",
                "-DincludeScope=runtime",
                f"-DoutputDirectory={tmp}",
            ]
            proc = subprocess.run(cmd, cwd=kit, capture_output=True, text=True, check=False)
            if proc.returncode != 0 or not any(tmp.glob("kafka_2.13-*.jar")):
                raise LocalInfraError(
                    f"fetching Kafka jars failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                    + "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
                )
            (tmp / ".pom-sha256").write_text(pom_hash + "\n")
            if dest.exists():
                shutil.rmtree(dest)
            tmp.rename(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def new_cluster_id() -> str:
    """A random KRaft cluster id: 16 random bytes, URL-safe base64 without padding, not starting with '-'."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):
            return cid


def render_properties(template: str, overrides: Mapping[str, str]) -> str:
    """Replace the value of each key in overrides within a .properties text, appending missing keys."""
    remaining = dict(overrides)
    out: list[str] = []
    for line in template.splitlines():
        match = re.match(r"\s*([^#!=:\s][^=:\s]*)\s*[=:]", line)
        if match and match.group(1) in remaining:
            key = match.group(1)
            out.append(f"{key}={remaining.pop(key)}")
        else:
            out.append(line)
    out.extend(f"{key}={value}" for key, value in remaining.items())
    return "\n".join(out) + "\n"


def kafka_error(bootstrap_servers: str, timeout: float = 5.0) -> str | None:
    """Ask the cluster for its brokers with a real kafka-python admin client.

    Returns None when at least one broker answered, else a short description of the failure.
    """
    from kafka import KafkaAdminClient  # imported here: importing this module stays cheap

    ms = max(int(timeout * 1000), 500)
    try:
        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap_servers,
            client_id="sensorwatch-localinfra-probe",
            bootstrap_timeout_ms=ms,
            request_timeout_ms=ms,
        )
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    try:
        brokers = admin.describe_cluster().get("brokers") or []
        return None if brokers else "cluster answered with no brokers"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        with contextlib.suppress(Exception):
            admin.close()


def wait_for_kafka(bootstrap_servers: str, timeout: float = 60.0) -> None:
    """Block until kafka_error() reports a broker, or raise LocalInfraError after timeout seconds."""
    until = deadline(timeout)
    error: str | None = "not tried"
    while time.monotonic() < until:
        error = kafka_error(bootstrap_servers, timeout=min(5.0, max(0.5, until - time.monotonic())))
        if error is None:
            return
        time.sleep(0.25)
    raise LocalInfraError(f"Kafka at {bootstrap_servers} did not answer within {timeout:.0f} s: {error}")


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask Linux to SIGTERM the broker if the Python process that started it dies (even by SIGKILL)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


class LocalKafka:
    """One throwaway single-node Kafka broker; use as a context manager or call start()/stop().

    Contract: after start() returns, `bootstrap_servers` ("127.0.0.1:PORT") accepts clients and topics
    are auto-created with 3 partitions. stop_broker()/start_broker() take the broker down and up again
    with the same address and data (outage tests). With ``secure=True`` it also listens with TLS and SASL
    (``secure_listeners``): SSL requires a client certificate (mutual TLS, ``pki.client_cert``/``client_key``),
    SASL_PLAINTEXT and SASL_SSL accept user ``SASL_USER`` with ``sasl_password`` over PLAIN, SCRAM-SHA-256 and
    SCRAM-SHA-512; certificates come from a throwaway CA (``pki.ca``). stop() is idempotent, sends SIGTERM,
    waits (then kills) and deletes the instance's temp dir (its data and broker.log) unless keep_dir=True.
    """

    def __init__(
        self,
        *,
        kit_dir: Path | None = None,
        jars_dir: Path | None = None,
        start_timeout: float = 60.0,
        heap: str = "512m",
        properties: Mapping[str, str] | None = None,
        keep_dir: bool = False,
        secure: bool = False,
    ) -> None:
        self._kit = _kit_dir(kit_dir)
        self._secure = secure
        self.sasl_password = secrets.token_urlsafe(18)
        self.pki: Pki | None = None
        self._secure_ports: dict[str, int] = {}
        self._jars_dir = jars_dir
        self._start_timeout = start_timeout
        self._heap = heap
        self._properties = dict(properties or {})
        self._keep_dir = keep_dir
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._port: int | None = None
        self._broker_port: int | None = None
        self._java_bin: str | None = None
        self._libs: Path | None = None
        self.startup_seconds: float | None = None

    # -- public API ---------------------------------------------------------------------------------
    @property
    def bootstrap_servers(self) -> str:
        """Address "127.0.0.1:PORT"; stays the same across stop_broker()/start_broker()."""
        if self._port is None:
            raise LocalInfraError("LocalKafka is not started")
        return f"127.0.0.1:{self._port}"

    @property
    def secure_listeners(self) -> dict[str, str]:
        """Security protocol -> "127.0.0.1:PORT" of the TLS and SASL listeners (empty unless ``secure=True``)."""
        if self._port is None:
            raise LocalInfraError("LocalKafka is not started")
        return {protocol: f"127.0.0.1:{port}" for protocol, port in self._secure_ports.items()}

    @property
    def directory(self) -> Path | None:
        """The instance's temp dir (server.properties, data/, broker.log), None when not started."""
        return self._dir

    @property
    def log_path(self) -> Path | None:
        """The broker's stdout/stderr file."""
        return self._dir / "broker.log" if self._dir else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Self:
        """Fetch jars if needed, format storage, start the broker and wait until a client gets metadata.

        Raises LocalInfraError (with the tail of the broker log) when the broker does not come up
        within start_timeout seconds; nothing is left running in that case.
        """
        if self._dir is not None:
            raise LocalInfraError("LocalKafka already started")
        began = time.monotonic()
        java = self._java()
        libs = ensure_jars(kit_dir=self._kit, jars_dir=self._jars_dir)
        self._dir = Path(tempfile.mkdtemp(prefix="sensorwatch-kafka-"))
        atexit.register(self.stop)
        try:
            if self._secure:
                self.pki = make_pki(self._dir / "tls")
            for attempt in range(3):  # a port picked as free can be taken before the broker binds it
                try:
                    self._launch(java, libs, began)
                    break
                except LocalInfraError as exc:
                    busy = "Address already in use" in str(exc)
                    self._terminate()
                    if not busy or attempt == 2:
                        raise
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the broker (SIGTERM, then SIGKILL after timeout seconds) and remove its temp dir."""
        self._terminate(timeout)
        atexit.unregister(self.stop)
        if self._dir is not None and not self._keep_dir:
            shutil.rmtree(self._dir, ignore_errors=True)
        self._dir = None
        self._port = None
        self._broker_port = None
        self._secure_ports = {}

    def stop_broker(self, *, kill: bool = False, timeout: float = 30.0) -> None:
        """Stop the broker process but keep its data, ports and dir (for outage tests).

        kill=True sends SIGKILL (a crash) instead of SIGTERM (a clean shutdown). After a crash the next
        start_broker() takes ~10 s longer: the controller waits out the old registration
        (broker.session.timeout.ms, 9 s by default; pass properties= to LocalKafka to shorten it).
        """
        if self._dir is None or self._broker_port is None:
            raise LocalInfraError("LocalKafka is not started")
        if kill and self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        self._terminate(timeout)

    def start_broker(self) -> None:
        """Start the broker again after stop_broker(), same address and data; return once it answers."""
        if self._dir is None or self._broker_port is None:
            raise LocalInfraError("LocalKafka is not started")
        if self.is_running():
            return
        self._spawn(time.monotonic())

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- internals ----------------------------------------------------------------------------------
    def _java(self) -> str:
        java_home = os.environ.get("JAVA_HOME")
        java = str(Path(java_home) / "bin" / "java") if java_home else shutil.which("java")
        if not java or not Path(java).exists():
            raise LocalInfraError(
                "a Java 17+ runtime is needed for the local Kafka broker; install one "
                "(Debian: apt-get install default-jdk-headless) or run `make system-deps`"
            )
        return java

    def _launch(self, java: str, libs: Path, began: float) -> None:
        assert self._dir is not None
        data = self._dir / "data"
        shutil.rmtree(data, ignore_errors=True)  # a re-format needs empty log.dirs
        broker_port = free_port()
        controller_port = free_port(exclude={broker_port})
        overrides = {
            "node.id": "1",
            "listeners": f"PLAINTEXT://127.0.0.1:{broker_port},CONTROLLER://127.0.0.1:{controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{broker_port}",
            "controller.quorum.bootstrap.servers": f"127.0.0.1:{controller_port}",
            "log.dirs": str(data),
        }
        scram: list[str] = []
        if self.pki is not None:
            taken = {broker_port, controller_port}
            for protocol in SECURE_PROTOCOLS:
                taken.add(port := free_port(exclude=taken))
                self._secure_ports[protocol] = port
            overrides.update(self._secure_properties(overrides["listeners"], overrides["advertised.listeners"]))
            for mechanism in ("SCRAM-SHA-256", "SCRAM-SHA-512"):
                scram += ["--add-scram", f"{mechanism}=[name={SASL_USER},password={self.sasl_password}]"]
        overrides.update(self._properties)
        props = self._dir / "server.properties"
        props.write_text(render_properties((self._kit / "server.properties").read_text(), overrides))
        classpath = f"{libs}/*"
        fmt = subprocess.run(
            [
                java,
                "-cp",
                classpath,
                "kafka.tools.StorageTool",
                "format",
                "--standalone",
                "-t",
                new_cluster_id(),
                "-c",
                str(props),
                *scram,
            ],
            capture_output=True,
            text=True,
            check=False,
            cwd=self._dir,
            timeout=120,
        )
        if fmt.returncode != 0:
            raise LocalInfraError(
                f"kafka StorageTool format failed (exit {fmt.returncode}):\n"
                + "\n".join((fmt.stdout + fmt.stderr).splitlines()[-30:])
            )
        self._java_bin, self._libs, self._broker_port = java, libs, broker_port
        self._spawn(began)

    def _secure_properties(self, listeners: str, advertised: str) -> dict[str, str]:
        """Broker settings for the TLS and SASL listeners on ``self._secure_ports`` (PEM key and trust stores)."""
        assert self.pki is not None
        extra = [f"{protocol}://127.0.0.1:{port}" for protocol, port in self._secure_ports.items()]
        plain = (f'org.apache.kafka.common.security.plain.PlainLoginModule required '
                 f'user_{SASL_USER}="{self.sasl_password}";')
        scram = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        props = {
            "listeners": ",".join([listeners, *extra]),
            "advertised.listeners": ",".join([advertised, *extra]),
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,"
                                              + ",".join(f"{p}:{p}" for p in SECURE_PROTOCOLS),
            "sasl.enabled.mechanisms": "PLAIN,SCRAM-SHA-256,SCRAM-SHA-512",
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(self.pki.broker_keystore),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(self.pki.ca),
            "listener.name.ssl.ssl.client.auth": "required",
            # ACLs apply (tests of refused authorization); without an ACL on a resource everyone may use it, and the
            # broker's own PLAINTEXT listeners (ANONYMOUS) may do everything
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "allow.everyone.if.no.acl.found": "true",
            "super.users": "User:ANONYMOUS",
        }
        for listener in ("sasl_plaintext", "sasl_ssl"):
            props[f"listener.name.{listener}.plain.sasl.jaas.config"] = plain
            for mechanism in ("scram-sha-256", "scram-sha-512"):
                props[f"listener.name.{listener}.{mechanism}.sasl.jaas.config"] = scram
        return props

    def _spawn(self, began: float) -> None:
        """Start the JVM on the formatted instance dir and wait until the broker answers."""
        assert self._dir is not None and self._java_bin and self._libs and self._broker_port
        java, classpath, broker_port = self._java_bin, f"{self._libs}/*", self._broker_port
        props = self._dir / "server.properties"
        log_path = self._dir / "broker.log"
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in _terminate()
        cmd = [
            java,
            f"-Xmx{self._heap}",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self._kit / 'log4j2.xml'}",
            "-cp",
            classpath,
            "kafka.Kafka",
            str(props),
        ]
        # PDEATHSIG fires when the forking *thread* ends, so only ask for it from the main thread.
        die_with_parent = sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread()
        self._proc = subprocess.Popen(
            cmd,
            cwd=self._dir,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent if die_with_parent else None,
        )
        until = began + self._start_timeout
        address = f"127.0.0.1:{broker_port}"
        while True:
            if self._proc.poll() is not None:
                raise LocalInfraError(
                    f"Kafka broker exited with code {self._proc.returncode} during startup; "
                    f"last lines of its log:\n{tail(log_path)}"
                )
            left = until - time.monotonic()
            if left <= 0:
                raise LocalInfraError(
                    f"Kafka broker at {address} not ready after {self._start_timeout:.0f} s; "
                    f"last lines of its log:\n{tail(log_path)}"
                )
            # A plain TCP check first keeps kafka-python from logging connection errors while the JVM boots.
            if port_open("127.0.0.1", broker_port) and kafka_error(address, timeout=min(5.0, left)) is None:
                self._port = broker_port
                return
            time.sleep(0.2)

    def _terminate(self, timeout: float = 30.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
