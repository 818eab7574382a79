"""The HTML report: generated from a database holding a known alert, then opened and checked for its plots, the
alert's shaded spans (where and when), its top sensors, and that it needs nothing outside the file."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from alert_data import SENSORS, T0, fleet, make_config, write_config
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import parse_config
from pipeline.errors import ConfigError
from pipeline.report import MARGIN, WIDTH, load_report_data, render_html
from pipeline.store import repo
from pipeline.store.db import make_engine, make_sessionmaker, upgrade
from pipeline.types import Score, datetime_to_ms, ms_to_datetime


class _Page(HTMLParser):
    """Collects every element with its attributes and the ``data-plot`` of the SVG it sits in."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str], str | None]] = []
        self.svg: str | None = None
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        if tag == "svg":
            self.svg = values.get("data-plot")
        self.elements.append((tag, values, self.svg))

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self.svg = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def find(self, tag: str, plot: str | None = None, **attrs: str) -> list[dict[str, str]]:
        return [a for t, a, p in self.elements if t == tag and (plot is None or p == plot)
                and all(a.get(k.replace("_", "-")) == v for k, v in attrs.items())]


def _raw_csv(path: Path) -> Path:
    """A reading every 10 s for pump-1 and pump-2 over the report span; pump-1 bearing_temp steps up 02:05-02:46."""
    ts = pd.date_range(ms_to_datetime(T0), periods=5 * 360, freq="10s")
    rng = np.random.default_rng(0)
    frames = []
    for asset in ("pump-1", "pump-2"):
        frame = pd.DataFrame({"ts": ts.map(lambda t: t.isoformat()), "asset": asset})
        for sensor in SENSORS:
            frame[sensor] = 50 + rng.normal(0, 1, len(ts))
        if asset == "pump-1":
            hot = (ts >= "2026-03-01T02:05:00Z") & (ts < "2026-03-01T02:46:00Z")
            frame.loc[hot, "bearing_temp"] += 25
        frames.append(frame)
    pd.concat(frames).to_csv(path, index=False)
    return path


def test_report_shows_plots_and_the_spans_of_a_known_alert(db_url: str, tmp_path: Path) -> None:
    upgrade(db_url)
    fleet(db_url, make_config(db_url))
    engine = make_engine(db_url)
    with make_sessionmaker(engine).begin() as s:
        known = repo.list_alerts(session=s, asset="pump-1", severity="critical")[0]
        repo_id, opened, closed = known.id, known.opened_at, known.closed_at
        known.off_training = {"bearing_temp": 18.4, "speed": -6.2}  # sensors far outside training, as stored
    engine.dispose()
    assert closed is not None
    config = write_config(tmp_path / "c.yaml", db_url)
    out = tmp_path / "reports" / "pump-1.html"

    result = CliRunner().invoke(app, [
        "report", "-c", str(config), "--asset", "pump-1", "--since", "2026-03-01T00:00:00Z",
        "--until", "2026-03-01T05:00:00Z", "--out", str(out), "--csv", str(_raw_csv(tmp_path / "raw.csv"))])
    assert result.exit_code == 0, result.output
    assert f"raw signals of {len(SENSORS)} from raw.csv" in result.output

    html = out.read_text(encoding="utf-8")
    page = _Page()
    page.feed(html)
    plots = {a["data-plot"] for a in page.find("svg")}
    assert plots == {"score"} | {f"sensor-error:{s}" for s in SENSORS} | {f"signal:{s}" for s in SENSORS}
    for plot in plots:
        assert any(len(p["points"].split()) > 50 for p in page.find("polyline", plot)), plot
    assert {p["data-series"] for p in page.find("polyline", "score")} == {"score", "threshold"}

    # the known alert is shaded on every plot, from its opening to its close, in its severity's colour
    spans = page.find("rect", data_alert_id=str(repo_id))
    assert {s["data-severity"] for s in spans} == {"critical"}
    assert len(spans) == len(plots)
    lo, hi = datetime_to_ms(datetime(2026, 3, 1, tzinfo=UTC)), datetime_to_ms(datetime(2026, 3, 1, 5, tzinfo=UTC))
    left, right = MARGIN[0], WIDTH - MARGIN[1]
    for span in spans:
        assert span["data-start"] == opened.strftime("%Y-%m-%dT%H:%M:%SZ")
        assert span["data-end"] == closed.strftime("%Y-%m-%dT%H:%M:%SZ")
        x0 = left + (datetime_to_ms(opened) - lo) / (hi - lo) * (right - left)
        x1 = left + (datetime_to_ms(closed) - lo) / (hi - lo) * (right - left)
        assert float(span["x"]) == pytest.approx(x0, abs=0.1)
        assert float(span["width"]) == pytest.approx(x1 - x0, abs=0.2)
    assert len(page.find("rect", "score", **{"class": "alert-span severity-warning"})) == 1  # the earlier warning

    # its top sensors are listed with their share, and labelled on that sensor's plots
    text = " ".join(page.text)
    row = page.find("tr", data_alert_id=str(repo_id))
    assert row and f"#{repo_id} 95%" in text
    assert "bearing_temp" in text and "critical" in text
    assert "95%" in html.split(f'id="alert-{repo_id}"')[1].split("</tr>")[0]
    assert "far outside training: bearing_temp +18.4 std, speed -6.2 std" in html.split(
        f'id="alert-{repo_id}"')[1].split("</tr>")[0]  # the sensors far outside training, under its top sensors

    # self-contained: no scripts, no external resources
    assert "<script" not in html and "http://" not in html.replace("http://www.w3.org/2000/svg", "")
    assert "src=" not in html and "<link" not in html

    # a CSV with no readings in the range: said so, and no empty signal plots
    later = CliRunner().invoke(app, [
        "report", "-c", str(config), "--asset", "pump-1", "--since", "2026-03-02T00:00:00Z",
        "--until", "2026-03-02T05:00:00Z", "--out", str(out), "--csv", str(tmp_path / "raw.csv")])
    assert later.exit_code == 0, later.output
    assert "raw signals of" not in later.output and "raw.csv has no readings of pump-1 between" in later.output
    assert "signal:" not in out.read_text(encoding="utf-8")


def test_report_data_and_render_without_scores_or_csv(db_url: str) -> None:
    upgrade(db_url)
    config = make_config(db_url)
    fleet(db_url, config)
    engine = make_engine(db_url)
    with make_sessionmaker(engine)() as s:
        data = load_report_data(session=s, group=config.groups[0], asset="pump-2",
                                start=datetime(2026, 3, 1, 3, tzinfo=UTC), end=datetime(2026, 3, 1, 6, tzinfo=UTC))
        empty = load_report_data(session=s, group=config.groups[0], asset="pump-3",
                                 start=datetime(2026, 3, 2, tzinfo=UTC), end=datetime(2026, 3, 3, tzinfo=UTC))
    engine.dispose()
    assert [a.status for a in data.alerts] == ["open"] and data.alerts[0].end_ms == max(s.end_ms for s in data.scores)
    assert data.signals == {} and data.tiers == ["warning", "critical"]
    page = _Page()
    page.feed(render_html(data))
    assert page.find("rect", "score", data_severity="warning")
    quiet = render_html(empty)
    assert "No window scores in this span." in quiet and "No alerts in this span." in quiet
    assert 'data-series="smoothed score (EWMA)"' not in render_html(data)
    smoothed = replace(data, scores=[replace(x, smoothed=x.score * 0.5) for x in data.scores])
    assert 'data-series="smoothed score (EWMA)"' in render_html(smoothed)  # drawn when the model smooths
    assert 'data-plot="drift-offsets"' not in render_html(data)
    followed = replace(data, scores=[replace(x, drift_offset={n: 0.01 * i for n in data.sensors})
                                     for i, x in enumerate(data.scores)])
    page = _Page()
    page.feed(render_html(followed))  # drawn when the group follows drift: one line per sensor
    assert {p["data-series"] for p in page.find("polyline", "drift-offsets")} == set(data.sensors)
    assert all(f"{sensor}</span> up to" in render_html(followed) for sensor in data.sensors)  # named in a legend


def test_report_rejects_an_unknown_asset_and_a_reversed_span(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'sw.db'}"
    upgrade(url)
    config = str(write_config(tmp_path / "c.yaml", url))
    cli = CliRunner()
    unknown = cli.invoke(app, ["report", "-c", config, "--asset", "fan-9", "--out", str(tmp_path / "r.html")])
    assert unknown.exit_code == 2 and "fan-9" in unknown.output and "note" not in unknown.output  # the error alone
    reversed_ = cli.invoke(app, ["report", "-c", config, "--asset", "pump-1", "--out", str(tmp_path / "r.html"),
                                 "--since", "2026-03-02", "--until", "2026-03-01"])
    assert reversed_.exit_code == 2


def test_an_asset_taken_out_of_the_configuration_is_reported_from_what_is_stored(db_url: str, tmp_path: Path) -> None:
    """A decommissioned asset's history stays in the database: the report uses its group's settings while the group
    is still configured, else its latest window's group and sensors with the default alert tiers."""
    import yaml
    from alert_data import config_dict

    upgrade(db_url)
    fleet(db_url, make_config(db_url))
    raw = config_dict(db_url, severities=[{"name": "low", "multiple": 1.0}, {"name": "high", "multiple": 2.0}])
    raw["groups"][0]["assets"] = ["pump-2", "pump-3"]  # pump-1 taken out; its group still configured
    kept = parse_config(raw, env={})
    raw["groups"][0]["name"] = "pumps-v2"  # and then the group renamed: pump-1's stored group is gone
    renamed = parse_config(raw, env={})
    span = {"start": datetime(2026, 3, 1, tzinfo=UTC), "end": datetime(2026, 3, 1, 5, tzinfo=UTC)}
    engine = make_engine(db_url)
    with make_sessionmaker(engine)() as s:
        alerts = len(repo.list_alerts(session=s, asset="pump-1", limit=None))
        in_group = load_report_data(session=s, group=None, groups=kept.groups, asset="pump-1", **span)
        stored = load_report_data(session=s, group=None, groups=renamed.groups, asset="pump-1", **span)
        with pytest.raises(ConfigError, match="'fan-9' is in no group of the configuration and has no stored"):
            load_report_data(session=s, group=None, asset="fan-9", **span)
    engine.dispose()
    assert alerts > 0 and len(stored.alerts) == alerts and stored.scores == in_group.scores
    assert (in_group.group, in_group.tiers) == ("pumps", ["low", "high"])
    assert (stored.group, stored.sensors, stored.tiers) == ("pumps", SENSORS, ["warning", "critical"])

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "pump-1.html"
    result = CliRunner().invoke(app, ["report", "-c", str(path), "--asset", "pump-1", "--since", "2026-03-01T00:00:00Z",
                                      "--until", "2026-03-01T05:00:00Z", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "pump-1 is in no group of" in result.output and f"{alerts} alert(s)" in result.output
    assert "(group pumps)" in out.read_text(encoding="utf-8")


def test_a_removed_asset_is_reported_with_the_group_of_its_windows_in_the_span(db_url: str) -> None:
    """An asset moved to another group before it was taken out: a span of its older history is reported with the
    group and sensors its windows there had, not those of its latest window (after the move), and its latest window
    is the one the alert engine judged (the first stored of that window's scores)."""
    upgrade(db_url)
    fleet(db_url, make_config(db_url))  # pump-1 in group pumps on 2026-03-01
    later = T0 + 5 * 86_400_000
    moved = [Score("pump-1", "fans", later + i * 50_000, later + i * 50_000 + 300_000, 0.2, 1.0,
                   {"rpm": 0.1, "current": 0.1}, "fans-v1") for i in range(3)]
    rescored = replace(moved[-1], group="blowers", sensor_errors={"airflow": 0.2}, model_version="blowers-v1")
    engine = make_engine(db_url)
    with make_sessionmaker(engine).begin() as s:
        repo.insert_scores(session=s, scores=moved)
        repo.insert_scores(session=s, scores=[rescored])  # a replay by another model: not the judged score
    with make_sessionmaker(engine)() as s:
        old = load_report_data(session=s, group=None, asset="pump-1", start=datetime(2026, 3, 1, tzinfo=UTC),
                               end=datetime(2026, 3, 1, 5, tzinfo=UTC))
        none_in_span = load_report_data(session=s, group=None, asset="pump-1",
                                        start=datetime(2026, 3, 2, tzinfo=UTC), end=datetime(2026, 3, 3, tzinfo=UTC))
    engine.dispose()
    assert (old.group, old.sensors) == ("pumps", SENSORS) and old.scores
    assert (none_in_span.group, none_in_span.sensors, none_in_span.scores) == ("fans", ["rpm", "current"], [])


def test_report_shades_maintenance_windows(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'sw.db'}"
    upgrade(url)
    fleet(url, make_config(url))
    config = make_config(url, maintenance=[{"assets": ["pump-3"], "start": "2026-03-01T03:30:00Z",
                                            "end": "2026-03-01T03:45:00Z"}])
    engine = make_engine(url)
    with make_sessionmaker(engine)() as s:
        data = load_report_data(session=s, group=config.groups[0], asset="pump-3",
                                start=datetime(2026, 3, 1, 3, tzinfo=UTC), end=datetime(2026, 3, 1, 5, tzinfo=UTC))
    engine.dispose()
    page = _Page()
    page.feed(render_html(data))
    (shade,) = page.find("rect", "score", **{"class": "maintenance"})
    # the run of scored windows that overlap the maintenance window: the first starts before it, the last ends after
    assert "2026-03-01T03:25:00Z" < shade["data-start"] <= "2026-03-01T03:30:00Z"
    assert "2026-03-01T03:45:00Z" <= shade["data-end"] < "2026-03-01T03:50:00Z"
    assert not page.find("rect", "score", **{"class": "alert-span severity-warning"})
