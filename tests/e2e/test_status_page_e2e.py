"""The status page in a real browser (Debian's chromium, headless) against the running demo.

Every chart holds data; the numbers shown equal ``/metrics`` at that moment; two loads
seconds apart differ; the page refreshes itself, and its script draws the server's layouts
exactly as the server does; it fits a phone's width. Screenshots are saved under the test's
tmp dir; with ``UPDATE_SCREENSHOTS=1`` the 1280x800 one also replaces the README's
(``docs/status-page.png``). With basic auth on, page and JSON ask for credentials.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest

from kvcache_exporter.sinks.status.svg import render as render_svg

from ..conftest import free_port, require_binary
from .browser import Chromium
from .conftest import EXPORTER, LoggedProcess, Samples, managed, parse_samples, wait_for

pytestmark = pytest.mark.e2e

README_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "status-page.png"
# Slow enough that the stream has quiet moments (a /metrics before and after a refresh can
# agree), small caches so evictions, lifetimes and restores come within seconds.
DEMO_ARGS = ("--speed", "4", "--gpu-blocks", "600", "--cpu-blocks", "1200", "--interval", "1")

# Every number on the page with its sample and labels; alerts count as a value of 1.
READ_FIGURES = """[...document.querySelectorAll('[data-metric]')].map(e => ({
    key: e.dataset.key, metric: e.dataset.metric, labels: JSON.parse(e.dataset.labels),
    value: e.dataset.value}))"""
READ_CHARTS = """[...document.querySelectorAll('svg.chart')].map(s => ({
    id: s.id, points: Number(s.dataset.points),
    marks: s.querySelectorAll('path.ln[d^="M"], rect.bar').length, html: s.outerHTML}))"""


@pytest.fixture
def chromium_bin() -> str:
    return require_binary("chromium", package="chromium")


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[tuple[LoggedProcess, str]]:
    """The demo as a user starts it; yields it and the URL it printed first."""
    port = free_port()
    argv = [*EXPORTER, "demo", "--web.listen-address", f"127.0.0.1:{port}", *DEMO_ARGS]
    with managed(LoggedProcess("demo", argv, tmp_path / "demo.log")) as process:
        wait_for(lambda: "status page at" in process.log_text(), 30, "the demo's first line")
        first = next(ln for ln in process.log_text().splitlines() if "kvcache-exporter demo" in ln)
        url = f"http://127.0.0.1:{port}/"
        assert first.split()[3:6] == ["page", "at", url], first  # the page URL comes first
        yield process, url


@pytest.fixture
def browser(chromium_bin: str, tmp_path: Path) -> Iterator[Chromium]:
    chromium = Chromium(chromium_bin, tmp_path / "chromium")
    try:
        yield chromium
    finally:
        chromium.close()


def get(url: str, auth: str | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url)
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status), dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def metrics(base: str) -> Samples:
    return parse_samples(get(base + "metrics")[2].decode())


def summed(samples: Samples, name: str, labels: dict[str, str]) -> float | None:
    values = [v for (n, key), v in samples.items() if n == name and set(labels.items()) <= key]
    return sum(values) if values else None


def expected(samples: Samples, figures: list[dict[str, Any]]) -> dict[str, float | None]:
    return {f["key"]: summed(samples, f["metric"], f["labels"]) for f in figures}


def active_alerts(samples: Samples) -> set[str]:
    return {
        f"{dict(key)['engine']}|!{dict(key)['alert']}"
        for (name, key), v in samples.items()
        if name == "kvcache_alert_active" and v == 1
    }


def wait_for_data(base: str) -> None:
    """Until both tiers have evicted (lifetimes) and the what-if has its curve."""

    def ready() -> bool:
        s = metrics(base)
        lifetimes = [
            summed(s, "kvcache_block_lifetime_seconds_count", {"medium": m}) or 0
            for m in ("GPU", "CPU")
        ]
        curve = summed(s, "kvcache_whatif_recomputes_avoided_total", {"medium": "GPU"})
        return min(lifetimes) > 0 and curve is not None

    wait_for(ready, 60, "evictions on both tiers and a what-if curve", step=0.5)


def test_the_page_shows_the_cache_and_agrees_with_metrics(
    demo: tuple[LoggedProcess, str], browser: Chromium, tmp_path: Path
) -> None:
    _, url = demo
    wait_for_data(url)
    time.sleep(3)  # a few history samples, so the time axis has a line
    browser.navigate(url)

    charts = browser.evaluate(READ_CHARTS)
    ids = {c["id"].rsplit("-", 1)[1] for c in charts}
    assert ids == {"resident", "rates", "ratio", "lifetime", "idle", "whatif"}
    assert len(charts) == 12  # two tiers
    for chart in charts:
        assert chart["points"] > 0 and chart["marks"] > 0, chart["id"]

    # The numbers shown equal /metrics at that moment: a refresh between two scrapes that
    # agree shows exactly what they show (every counter compared is monotonic, so nothing
    # moved in between). The stream pauses between requests; retry until one falls there.
    for _attempt in range(60):
        before = metrics(url)
        browser.evaluate("window.kvcacheStatus.refresh().then(() => true)", await_promise=True)
        figures = browser.evaluate(READ_FIGURES)
        after = metrics(url)
        plain = [f for f in figures if f["metric"] != "kvcache_alert_active"]
        if expected(before, plain) == expected(after, plain) and active_alerts(
            before
        ) == active_alerts(after):
            break
        time.sleep(0.05)
    else:
        pytest.fail("the stream never paused between two scrapes")
    want = expected(after, plain)
    assert len(plain) >= 30  # both tiers' counters, what-if rows, health
    for figure in plain:
        shown = None if figure["value"] == "" else float(figure["value"])
        assert shown == want[figure["key"]], figure
    shown_alerts = {f["key"] for f in figures if f["metric"] == "kvcache_alert_active"}
    assert shown_alerts == active_alerts(after)
    browser.screenshot(tmp_path / "status-1280x800.png", 1280, 800)

    # The script draws the server's layouts exactly as the server's renderer does.
    document = json.loads(get(url + "api/v1/status")[2])
    layouts = [c for m in document["engines"][0]["media"] for c in m["charts"]]
    same = browser.evaluate(
        f"""(() => {{
        const layouts = {json.dumps(layouts)};
        const server = {json.dumps([render_svg(c) for c in layouts])};
        return layouts.map((c, i) => {{
            const drawn = window.kvcacheStatus.draw(c);
            const parsed = document.createElement('div');
            parsed.innerHTML = server[i];  // as the page embeds it
            const equal = drawn.isEqualNode(parsed.firstElementChild);
            return equal ? true : [drawn.outerHTML, parsed.innerHTML];
        }});
        }})()"""
    )
    assert same == [True] * len(layouts)

    # Two loads seconds apart differ, and the page refreshes itself in between.
    first = {f["key"]: f["value"] for f in browser.evaluate(READ_FIGURES)}
    stamp = browser.evaluate("document.getElementById('generated').dataset.value")
    wait_for(
        lambda: browser.evaluate("document.getElementById('generated').dataset.value") != stamp,
        15,
        "the page's own refresh",
        step=0.5,
    )
    browser.navigate(url)
    second = {f["key"]: f["value"] for f in browser.evaluate(READ_FIGURES)}
    stored = [k for k in first if k.endswith("|stored_total")]
    assert all(float(second[k]) > float(first[k]) for k in stored), (first, second)
    assert [c["html"] for c in browser.evaluate(READ_CHARTS)] != [c["html"] for c in charts]

    browser.screenshot(tmp_path / "status-1280x800-later.png", 1280, 800)
    if os.environ.get("UPDATE_SCREENSHOTS"):
        shutil.copyfile(tmp_path / "status-1280x800-later.png", README_SCREENSHOT)

    # A phone: one column, nothing wider than the screen.
    browser.screenshot(tmp_path / "status-390x844.png", 390, 844, mobile=True)
    assert browser.evaluate("document.documentElement.scrollWidth") <= 390
    print(f"screenshots in {tmp_path}")


def test_with_javascript_off_the_page_is_a_static_snapshot(
    demo: tuple[LoggedProcess, str], browser: Chromium, tmp_path: Path
) -> None:
    _, url = demo
    wait_for_data(url)
    browser.call("Emulation.setScriptExecutionDisabled", value=True)
    browser.navigate(url)
    assert browser.evaluate("typeof window.kvcacheStatus") == "undefined"  # no page script ran
    charts = browser.evaluate(READ_CHARTS)
    assert len(charts) == 12
    assert all(c["points"] > 0 and c["marks"] > 0 for c in charts)
    assert browser.evaluate("document.querySelectorAll('[data-metric]').length") >= 30
    browser.screenshot(tmp_path / "status-no-javascript.png", 1280, 800)


def test_with_basic_auth_the_page_asks_for_credentials(tmp_path: Path) -> None:
    hashed = bcrypt.hashpw(b"look", bcrypt.gensalt(rounds=4)).decode()
    config = tmp_path / "web.yml"
    config.write_text(f"basic_auth_users:\n  operator: '{hashed}'\n")
    port = free_port()
    argv = [
        *EXPORTER,
        "--source",
        "e=tcp://127.0.0.1:1",
        "--web.config.file",
        str(config),
        "--web.listen-address",
        f"127.0.0.1:{port}",
    ]
    with managed(LoggedProcess("kvcache-exporter", argv, tmp_path / "exporter.log")):
        base = f"http://127.0.0.1:{port}/"
        wait_for(lambda: get(base)[0] == 401, 15, "the exporter to answer")
        for path in ("", "api/v1/status"):
            status, headers, _ = get(base + path)
            assert status == 401 and headers["WWW-Authenticate"].startswith("Basic "), path
            assert get(base + path, "operator:wrong")[0] == 401
        status, _, body = get(base, "operator:look")
        assert status == 200 and b"kvcache-exporter" in body and b"No blocks seen yet" in body
        status, _, body = get(base + "api/v1/status", "operator:look")
        assert status == 200 and json.loads(body)["engines"][0]["engine"] == "e"
