"""`python -m pipeline.localinfra kafka|postgres|jars`: run one local service until SIGTERM or Ctrl-C.

`kafka` prints KAFKA_BOOTSTRAP_SERVERS=..., `postgres` prints DATABASE_URL=... (one line on stdout,
ready to paste after `export`); `jars` fetches the Kafka jars into the cache and prints their folder.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from types import FrameType

from pipeline.localinfra._util import LocalInfraError
from pipeline.localinfra.kafka import LocalKafka, ensure_jars
from pipeline.localinfra.postgres import LocalPostgres


def _wait_for_signal() -> None:
    """Block until SIGTERM, SIGINT or SIGHUP."""
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, handler)
    while not stop.wait(3600):
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.localinfra",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="service", required=True)
    sub.add_parser("kafka", help="run a single-node Kafka broker on a free port")
    pg = sub.add_parser("postgres", help="run a throwaway PostgreSQL cluster on a free port")
    pg.add_argument("--dbname", default="sensorwatch", help="database to create (default: %(default)s)")
    sub.add_parser("jars", help="fetch the Kafka broker jars into the cache (once) and print the folder")
    args = parser.parse_args(argv)

    try:
        if args.service == "jars":
            print(ensure_jars(), flush=True)
            return 0
        if args.service == "kafka":
            with LocalKafka() as kafka:
                print(f"KAFKA_BOOTSTRAP_SERVERS={kafka.bootstrap_servers}", flush=True)
                print(
                    f"broker up in {kafka.startup_seconds:.1f} s, log {kafka.log_path}; Ctrl-C or SIGTERM stops it",
                    file=sys.stderr,
                    flush=True,
                )
                _wait_for_signal()
            return 0
        with LocalPostgres(dbname=args.dbname) as postgres:
            print(f"DATABASE_URL={postgres.url}", flush=True)
            print(
                f"PostgreSQL up in {postgres.startup_seconds:.1f} s, cluster in {postgres.directory}; "
                "Ctrl-C or SIGTERM stops it",
                file=sys.stderr,
                flush=True,
            )
            _wait_for_signal()
        return 0
    except LocalInfraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
