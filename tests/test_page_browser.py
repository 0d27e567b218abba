"""The results page in a real browser (headless Chromium through selenium).

Proves: the page loads with no console errors; the scatter holds every particle; a box drawn
with the mouse and a lasso, saved with "save selection" (a real download) and fed to
`deephemnma select`, give exactly the particles inside them; hover names the particle; each
main view renders (a screenshot per view, checked not blank; kept in $DEEPHEMNMA_SHOTS if set).
Skips, with the reason, where Chromium, its driver or selenium is missing (make test installs them).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from deephemnma.commands.report import report_sections
from deephemnma.core.star import read_star
from deephemnma.report import build_report

from _browser import chromium, console_errors, element_png, not_blank, unavailable, wait_for, wait_for_file
from _pagetree import make_results_tree

REASON = unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"no headless Chromium: {REASON}")
N = 5000


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser") / "results"
    table = make_results_tree(root, n=N)
    out = build_report(root, root / "report.html", report_sections())
    downloads = root.parent / "downloads"
    downloads.mkdir()
    with chromium(download_dir=downloads) as driver:
        driver.get(out.resolve().as_uri())
        wait_for(driver, "window.dhPage && window.dhPage.ready")
        yield {"driver": driver, "root": root, "table": table, "downloads": downloads}


def f32(v):
    return np.asarray(v, np.float64).astype(np.float32).astype(np.float64)


def drag(driver, points):
    """Press at points[0] (CSS px from the plot canvas's top-left), move through the rest, release."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    ov = driver.find_element(By.CSS_SELECTOR, "#dh-landscape canvas.dh-overlay")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", ov)
    w, h = ov.size["width"], ov.size["height"]
    chain = ActionChains(driver, duration=10)
    chain.move_to_element_with_offset(ov, points[0][0] - w // 2, points[0][1] - h // 2).click_and_hold()
    prev = points[0]
    for p in points[1:]:
        chain.move_by_offset(p[0] - prev[0], p[1] - prev[1])
        prev = p
    chain.release().perform()


def saved_selection(page) -> dict:
    """Click "save selection" and read the downloaded file (an earlier one is removed first)."""
    from selenium.webdriver.common.by import By

    target = page["downloads"] / "selection.json"
    if target.exists():
        target.unlink()
    page["driver"].find_element(By.CSS_SELECTOR, "#dh-landscape .dh-save").click()
    path = wait_for_file(target)
    time.sleep(0.2)
    return json.loads(path.read_text())


def run_select(run_cli, page, doc, tmp_path):
    sel = tmp_path / "sel.json"
    sel.write_text(json.dumps(doc))
    out = tmp_path / "picked.star"
    res = run_cli("select", "--particles", page["root"] / "groups" / "particles.star", "--selection", sel, "--out", out)
    assert res.returncode == 0, res.stderr
    return read_star(out).particles


def test_loads_without_console_errors_and_holds_every_particle(page):
    d = page["driver"]
    assert console_errors(d) == [] and d.execute_script("return dhPage.errors") == []
    assert d.execute_script("return dhPage.landscape.n") == N
    assert d.execute_script("return dhPage.landscape.x.length") == N
    # every particle is drawn: the per-pixel counts add up to N times the dot's pixel count
    drawn = d.execute_script("const L = dhPage.landscape; L.view = Object.assign({}, L.home); L.render();"
                             "let s = 0; for (const c of L.acc.cnt) s += c; return s / L.splat().length")
    assert abs(drawn - N) / N < 0.01  # dots clipped at the plot's edge lose a few pixels


def test_box_drawn_with_the_mouse_round_trips_through_select(page, run_cli, tmp_path):
    d = page["driver"]
    plot = d.execute_script("return dhPage.landscape.plot")
    x0, y0 = plot["x"] + 0.30 * plot["w"], plot["y"] + 0.25 * plot["h"]
    drag(d, [(x0, y0), (x0 + 0.2 * plot["w"], y0 + 0.2 * plot["h"]), (x0 + 0.35 * plot["w"], y0 + 0.5 * plot["h"])])
    count = wait_for(d, "dhPage.landscape.count")
    doc = saved_selection(page)
    assert doc["count"] == count and len(doc["shapes"]) == 1 and doc["shapes"][0]["type"] == "box"
    (bx0, bx1), (by0, by1) = doc["shapes"][0]["x"], doc["shapes"][0]["y"]
    t = page["table"]
    x, y = f32(t["dhnmaPC1"]), f32(t["dhnmaPC2"])
    inside = [a >= bx0 and a <= bx1 and b >= by0 and b <= by1 for a, b in zip(x, y)]  # plainly, per particle
    expect = t["rlnImageName"][np.array(inside)].tolist()
    assert 0.02 * N < len(expect) < 0.9 * N and doc["count"] == len(expect)
    assert doc["indices"] == [int(i) for i in np.flatnonzero(inside)]
    got = run_select(run_cli, page, doc, tmp_path)
    assert got["rlnImageName"].tolist() == expect
    assert list(got.columns) == list(t.columns)


def test_lasso_added_with_shift_round_trips(page, run_cli, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    d = page["driver"]
    d.find_element(By.CSS_SELECTOR, '#dh-landscape [data-mode="lasso"]').click()
    plot = d.execute_script("return dhPage.landscape.plot")
    cx, cy, r = plot["x"] + 0.75 * plot["w"], plot["y"] + 0.5 * plot["h"], 0.15 * plot["h"]
    pts = [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in np.linspace(0, 2 * np.pi, 24)]
    ActionChains(d).key_down(Keys.SHIFT).perform()
    drag(d, pts)
    ActionChains(d).key_up(Keys.SHIFT).perform()
    doc = saved_selection(page)
    assert [s["type"] for s in doc["shapes"]] == ["box", "lasso"]
    got = run_select(run_cli, page, doc, tmp_path)
    assert len(got) == doc["count"] == d.execute_script("return dhPage.landscape.count")
    d.find_element(By.CSS_SELECTOR, '#dh-landscape [data-mode="box"]').click()


def test_hover_names_the_particle(page):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    d = page["driver"]
    d.find_element(By.CSS_SELECTOR, "#dh-landscape .dh-clear").click()
    i = int(np.argmin(np.hypot(page["table"]["dhnmaPC1"] - 55, page["table"]["dhnmaPC2"] + 5)))  # a dense spot
    sx, sy = d.execute_script(f"const L = dhPage.landscape; return L.toScreen(L.x[{i}], L.y[{i}])")
    ov = d.find_element(By.CSS_SELECTOR, "#dh-landscape canvas.dh-overlay")
    w, h = ov.size["width"], ov.size["height"]
    ActionChains(d).move_to_element_with_offset(ov, int(round(sx - w / 2)), int(round(sy - h / 2))).perform()
    tip = wait_for(d, "!document.querySelector('#dh-landscape .dh-tip').hidden && "
                      "document.querySelector('#dh-landscape .dh-tip').textContent")
    hovered = d.execute_script("return dhPage.landscape.hover")
    assert page["table"]["rlnImageName"][hovered] in tip and "group" in tip
    assert np.hypot(page["table"]["dhnmaPC1"][hovered] - page["table"]["dhnmaPC1"][i],
                    page["table"]["dhnmaPC2"][hovered] - page["table"]["dhnmaPC2"][i]) < 5


@pytest.mark.parametrize("view, ready", [
    ("#dh-landscape", "dhPage.ready"),
    ("#health", "true"),
    ("#groups", "true"),
    ("#dh-motion3d", "document.getElementById('dh-motion3d').dataset.loaded"),
    ("#dh-maps3d", "document.getElementById('dh-maps3d').dataset.loaded"),
])
def test_each_view_renders(page, view, ready):
    d = page["driver"]
    element_png(d, view)  # scroll into view: the 3D viewers start when visible
    wait_for(d, ready, timeout=60)
    time.sleep(1.0)  # WebGL frames on the CPU
    png = element_png(d, view)
    ok, why = not_blank(png)
    if os.environ.get("DEEPHEMNMA_SHOTS"):
        Path(os.environ["DEEPHEMNMA_SHOTS"]).mkdir(parents=True, exist_ok=True)
        (Path(os.environ["DEEPHEMNMA_SHOTS"]) / f"{view.strip('#')}.png").write_bytes(png)
    assert ok, f"{view} looks blank: {why}"
    assert console_errors(d) == []


def test_colour_by_any_column_and_level_slider(page):
    from selenium.webdriver.support.ui import Select
    from selenium.webdriver.common.by import By

    d = page["driver"]
    for name in ("dhnmaScore", "dhnmaFlag", "dhnmaSource", "density", "dhnmaGroup"):
        Select(d.find_element(By.CSS_SELECTOR, "#dh-landscape .dh-colour")).select_by_value(name)
        assert d.execute_script("return dhPage.landscape.colourBy") == name
    element_png(d, "#dh-maps3d")
    wait_for(d, "document.getElementById('dh-maps3d').dataset.loaded", timeout=60)
    d.execute_script("const s = document.querySelector('#dh-maps3d .dh-level'); s.value = 5; s.dispatchEvent(new Event('input'))")
    assert d.execute_script("return dhPage.views3d.maps.repr.getParameters().isolevel") == 5
    assert console_errors(d) == []
