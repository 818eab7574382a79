"""Log output: one line per record off a terminal (plain or JSON), UTC stamps, the format chosen by --log-format."""

from __future__ import annotations

import json
import logging

import pytest
from typer.testing import CliRunner

from pipeline import logs
from pipeline.cli import app


def _record(msg: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            import sys

            exc_info = sys.exc_info()
    record = logging.LogRecord("pipeline.runner", logging.WARNING, __file__, 1, msg, args, exc_info)
    record.created = 1_795_000_000.25  # 2026-11-18T11:06:40.250Z
    return record


def test_plain_lines_are_stamped_in_utc_and_never_wrapped() -> None:
    long = "x" * 300
    line = logs.PlainFormatter().format(_record("asset %s: %s", "pump-1", long))
    assert line == f"2026-11-18T11:06:40.250Z WARNING pipeline.runner: asset pump-1: {long}"
    with_exc = logs.PlainFormatter().format(_record("failed", exc=True)).splitlines()
    assert with_exc[0].endswith("pipeline.runner: failed") and with_exc[-1] == "RuntimeError: boom"


def test_json_lines_carry_the_record_and_its_traceback() -> None:
    text = logs.JsonFormatter().format(_record("asset %s: \"quoted\"\nsecond line", "pump-1", exc=True))
    assert "\n" not in text
    doc = json.loads(text)
    assert doc["ts"] == "2026-11-18T11:06:40.250Z" and doc["level"] == "WARNING"
    assert doc["logger"] == "pipeline.runner" and doc["message"] == 'asset pump-1: "quoted"\nsecond line'
    assert doc["exc"].startswith("Traceback") and doc["exc"].endswith("RuntimeError: boom")


def test_auto_is_rich_on_a_terminal_only_and_unknown_formats_are_refused() -> None:
    assert logs.resolve("auto", is_terminal=True) == "rich"
    assert logs.resolve("auto", is_terminal=False) == "plain"
    assert logs.resolve("json", is_terminal=True) == "json"
    with pytest.raises(ValueError, match="log format must be one of auto, rich, plain, json, not 'xml'"):
        logs.resolve("xml", is_terminal=False)


def test_the_cli_logs_in_the_chosen_format(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "c.yaml"
    config.write_text("database: {url: 'sqlite:///" + str(tmp_path / "sw.db") + "'}\n"
                      "groups:\n  - name: g\n    assets: [a]\n    sensors: [{name: x}, {name: y}]\n"
                      "    model: {type: lstm, beta: 2.0}\n")
    runner = CliRunner()
    as_json = runner.invoke(app, ["--log-format", "json", "models", "list", "-c", str(config)])
    lines = [json.loads(line) for line in as_json.output.splitlines() if line.startswith("{")]
    assert any(d["logger"] == "pipeline.config" and "beta not used by type lstm" in d["message"] for d in lines)
    from_env = runner.invoke(app, ["models", "list", "-c", str(config)], env={"SENSORWATCH_LOG_FORMAT": "plain"})
    assert " WARNING pipeline.config: group g: model: beta not used by type lstm" in from_env.output
    bad = runner.invoke(app, ["models", "list", "-c", str(config)],
                        env={"SENSORWATCH_LOG_FORMAT": "xml", "COLUMNS": "200"})
    assert bad.exit_code == 2 and "log format must be one of" in bad.output


def test_kafka_library_errors_pass_once_a_minute_per_message() -> None:
    """kafka-python logged ~2 connection errors a second per process through a broker outage (scale-out trial)."""
    now = [0.0]
    gate = logs.OncePerInterval("kafka", clock=lambda: now[0])

    def record(name: str, msg: str) -> logging.LogRecord:
        return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, ("node-1",), None)

    passed = [gate.filter(record("kafka.conn", "Connection failed: %s")) for _ in range(50)]
    assert passed == [True] + [False] * 49
    assert gate.filter(record("kafka.client", "Metadata refresh failed: %s"))  # another message: its own count
    assert all(gate.filter(record("pipeline.runner", "dependency unavailable (%s)")) for _ in range(5))  # not ours
    now[0] = 61.0
    assert gate.filter(record("kafka.conn", "Connection failed: %s"))


def test_fatal_errors_follow_the_log_format(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """They were rich text wrapped at 80 columns whatever the format: a log shipper got garbage on exactly that path."""
    bad = tmp_path / "c.yaml"
    bad.write_text("groups:\n  - name: g\n    assets: [a]\n    sensors: [{name: x}]\n    window: {length: 1}\n")
    result = CliRunner().invoke(app, ["--log-format", "json", "alerts", "list", "-c", str(bad)])
    assert result.exit_code == 2
    (doc,) = [json.loads(line) for line in result.output.splitlines() if line.strip()]
    assert doc["level"] == "ERROR" and doc["message"].startswith(f"configuration error in {bad}: ")
    assert "groups[0].window.length" in doc["message"]
    missing = CliRunner().invoke(app, ["--log-format", "plain", "alerts", "ack", "-c", str(tmp_path / "none.yaml"),
                                       "1", "--by", "x"])
    assert missing.exit_code == 2 and " ERROR pipeline.cli: configuration error in " in missing.output


@pytest.mark.parametrize("fmt", ["plain", "json"])
def test_plain_and_json_on_a_terminal_go_around_a_progress_bar_whole(fmt: str) -> None:
    import io

    from rich.console import Console
    from rich.progress import Progress

    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=40, color_system=None)
    try:
        assert logs.configure(fmt, verbose=False, console=console) == fmt
        long = "y" * 120
        with Progress(console=console, auto_refresh=False) as bar:
            task = bar.add_task("training", total=2)
            bar.advance(task)
            bar.refresh()
            logging.getLogger("pipeline.test").warning("asset %s: %s", "pump-1", long)
            bar.advance(task)
    finally:
        logs.configure("plain", verbose=False, console=Console(file=io.StringIO()))
    text = out.getvalue()
    # the record is one unbroken line (not wrapped at the console's 40 columns), written above the bar's redraw
    lines = [ln for ln in text.replace("\r", "\n").split("\n") if long in ln]
    assert len(lines) == 1, text
    line = lines[0]
    assert "training" not in line and "%" not in line  # not appended to the bar's line
    if fmt == "json":
        assert json.loads(line[line.index("{"):])["message"] == f"asset pump-1: {long}"
    else:
        assert line.endswith(f"WARNING pipeline.test: asset pump-1: {long}")
    assert "training" in text


def test_the_schedulers_per_firing_chatter_is_quiet_and_its_warnings_are_not() -> None:
    import io

    from rich.console import Console

    logs.configure("plain", verbose=False, console=Console(file=io.StringIO()))
    executor = logging.getLogger("apscheduler.executors.default")
    assert not executor.isEnabledFor(logging.INFO) and executor.isEnabledFor(logging.WARNING)
    assert logging.getLogger("pipeline.scheduler").isEnabledFor(logging.INFO)  # the jobs' own outcome lines
