"""The dashboard in a real headless Chromium: the page renders offline and the revenue chart is drawn.

Needs Debian's ``chromium`` (/usr/bin/chromium), which a test cannot install without root. On a
laptop without it the test is skipped and the skip names the install command; under CI (``CI``
set, as `.ci/run` runs) a missing browser is a failure: a dashboard nobody has seen render is not
tested.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from gateway.ops.admin import BAR_COLOR
from tests.conftest import Devchain, GatewayFactory
from tests.e2e.test_paid_call import pay

WIDTH, HEIGHT = 1200, 900
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
    "--hide-scrollbars", f"--window-size={WIDTH},{HEIGHT}",
]


CHROMIUM_FALLBACK = Path("/usr/bin/chromium")
INSTALL_COMMAND = "sudo apt-get install -y chromium"


def chromium() -> str:
    found = shutil.which("chromium") or (str(CHROMIUM_FALLBACK) if CHROMIUM_FALLBACK.exists() else None)
    if found is None:
        reason = f"chromium is not installed: {INSTALL_COMMAND} (.ci/run installs it)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(reason)
        pytest.skip(reason)
    return found


@pytest.mark.parametrize("ci", [None, "true"], ids=["laptop", "CI=true"])
def test_a_missing_browser_is_a_skip_naming_the_install_command_and_a_failure_under_ci(
    ci: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no chromium on PATH
    monkeypatch.setattr(f"{__name__}.CHROMIUM_FALLBACK", tmp_path / "chromium")  # nor at Debian's path
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    outcome = pytest.fail.Exception if ci else pytest.skip.Exception
    with pytest.raises(outcome) as info:
        chromium()
    assert INSTALL_COMMAND in str(info.value)


def run_chromium(profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # The timeout only stops a hung browser from hanging the suite; it is not a measurement.
    return subprocess.run(
        [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=180, check=False,
    )


def decode_png(data: bytes) -> tuple[int, int, list[list[tuple[int, int, int]]]]:
    """Width, height and RGB rows of an 8-bit RGB or RGBA, non-interlaced PNG (what Chromium writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and color in (2, 6) and interlace == 0, (depth, color, interlace)
    bpp = 3 if color == 2 else 4
    raw, stride = zlib.decompress(idat), width * bpp
    rows: list[list[tuple[int, int, int]]] = []
    previous = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        for i in range(stride):
            left = line[i - bpp] if i >= bpp else 0
            up, up_left = previous[i], (previous[i - bpp] if i >= bpp else 0)
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - up_left
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - up_left)
                line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else up_left)) & 0xFF
        rows.append([(line[x], line[x + 1], line[x + 2]) for x in range(0, stride, bpp)])
        previous = line
    return width, height, rows


def test_dashboard_renders_the_revenue_chart_in_chromium(
    start_gateway: GatewayFactory, devchain: Devchain, tmp_path: Path
) -> None:
    gateway = start_gateway(admin_token="browser-test-token")
    with gateway.client() as client:
        for path in ("/quotes/AAPL", "/weather?city=Lisbon", "/reports/42"):
            _, paid, _ = pay(client, devchain, "GET", path)
            assert paid.status_code == 200, paid.text
        _, failed, _ = pay(client, devchain, "GET", "/reports/500")
        assert failed.status_code == 500
    url = f"{gateway.url}/admin?token=browser-test-token"

    dom = run_chromium(tmp_path / "profile-dom", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'id="revenue-chart"' in dom.stdout, dom.stdout[:2000]
    assert 'class="bar"' in dom.stdout  # at least one non-empty bucket drawn
    assert "get_quote" in dom.stdout and "Top payers" in dom.stdout
    assert "browser-test-token" not in dom.stdout

    shot = tmp_path / "admin.png"
    result = run_chromium(tmp_path / "profile-shot", f"--screenshot={shot}", url)
    assert result.returncode == 0, result.stderr[-2000:]
    assert shot.exists() and shot.stat().st_size > 1000
    width, height, rows = decode_png(shot.read_bytes())
    assert (width, height) == (WIDTH, HEIGHT)
    target = tuple(int(BAR_COLOR[i:i + 2], 16) for i in (1, 3, 5))
    bar_pixels = [
        (x, y) for y, row in enumerate(rows) for x, rgb in enumerate(row)
        if all(abs(a - b) <= 8 for a, b in zip(rgb, target))
    ]
    # The bars are drawn, and drawn where the chart is: in the top part of the page.
    assert len(bar_pixels) > 200, len(bar_pixels)
    assert max(y for _, y in bar_pixels) < HEIGHT // 2
