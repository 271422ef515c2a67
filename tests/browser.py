"""Headless Chromium driven over its DevTools protocol (`--remote-debugging-port`, over the
websocket client of aiohttp, which MLflow depends on): the MLflow UI tests and
bench/screenshots.py open pages, run JavaScript in them and take screenshots with it.

The MLflow UI is a React app:
- MLflow 3 opens an experiment on its GenAI overview; the training runs table is the
  `#/experiments/<id>/runs` route (or `?workflowType=machine_learning`).
- Child runs are collapsed under their parent: the parent's Run Name cell has an expander
  button (`data-component-id` ending in `runnamecellrenderer.tsx_<n>`). Before it is
  clicked only the parent row is shown; after, the children's rows follow it.
- Table rows carry `row-id` = the run id (the grid renders each row twice: pinned and
  scrolled columns).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

UI_TIMEOUT_S = 90  # the first load of the UI bundle on a busy 2-CPU box
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,1000", "--remote-debugging-port=0"]


def chromium() -> str:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
    if not os.access(chromium, os.X_OK):
        pytest.fail("Chromium is not installed: `apt-get install -y chromium` (Debian) to run this test.")
    return chromium


class Page:
    """One Chromium tab over the DevTools protocol: `evaluate` JavaScript, `screenshot`."""

    def __init__(self, ws: Any) -> None:
        self.ws, self.n = ws, 0

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.n += 1
        await self.ws.send_json({"id": self.n, "method": method, "params": params})
        while True:  # skip events and older replies
            message = await asyncio.wait_for(self.ws.receive(), timeout=60)
            assert message.type.name == "TEXT", f"DevTools connection closed: {message}"
            reply = json.loads(message.data)
            if reply.get("id") == self.n:
                assert "error" not in reply, f"{method}: {reply['error']}"
                return reply["result"]

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                                 awaitPromise=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    async def wait_for(self, expression: str, what: str, timeout: float = UI_TIMEOUT_S) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = await self.evaluate(expression)
            if value:
                return value
            await asyncio.sleep(0.5)
        text = await self.evaluate("document.body ? document.body.innerText : ''")
        pytest.fail(f"the MLflow UI did not show {what} within {timeout} s; the page reads:\n{text[-3000:]}")

    async def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode((await self.call("Page.captureScreenshot", format="png"))["data"]))


def devtools_page_url(profile: Path, proc: subprocess.Popen) -> str:
    """The websocket URL of the browser's first tab (the port Chromium chose is written to
    `<user-data-dir>/DevToolsActivePort`)."""
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 60
    while not (port_file.exists() and port_file.read_text().strip()):
        if proc.poll() is not None:
            pytest.fail(f"chromium exited with {proc.returncode} before opening DevTools")
        if time.monotonic() > deadline:
            pytest.fail("chromium did not open its DevTools port within 60 s")
        time.sleep(0.1)
    port = int(port_file.read_text().split()[0])
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
        targets = json.load(response)
    return next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")


async def with_page(ws_url: str, body) -> Any:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:
        page = Page(ws)
        await page.call("Page.enable")
        return await body(page)


# JavaScript: the run-table row ids (run ids) shown, in order, and the parent row's expander.
ROW_IDS = ("Array.from(new Set(Array.from(document.querySelectorAll('.ag-center-cols-container [role=row]'))"
           ".sort((a, b) => Number(a.getAttribute('row-index')) - Number(b.getAttribute('row-index')))"
           ".map(r => r.getAttribute('row-id'))))")


def expand(run_id: str) -> str:
    return (f"(() => {{ const rows = document.querySelectorAll('[role=row][row-id=\"{run_id}\"]');"
            "for (const row of rows) { const b = row.querySelector("
            "'button[data-component-id*=\"runnamecellrenderer\"]'); if (b) { b.click(); return true; } }"
            "return false; })()")


def in_chromium(chromium: str, tmp_path: Path, check) -> Any:
    """Run `check(page)` in a fresh headless Chromium (its own profile), then close it."""
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    proc = subprocess.Popen([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        return asyncio.run(with_page(devtools_page_url(profile, proc), check))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
