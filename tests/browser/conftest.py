"""Real browsers for the UI tests: Playwright driving the system Chromium (no download),
and what the terminal pages share: a password sshd, a user signed in to reach it, and
reading xterm.js's screen."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, async_playwright

from ..conftest import Running
from ..integration.test_ssh_terminal import PASSWORD, USER, signed_in
from ..peers.sshd import Sshd, ensure_user, sshd_available

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"

_BUFFER_TEXT = """(name) => {
  const b = window[name].buffer.active;
  const out = [];
  for (let i = 0; i < b.length; i++) out.push(b.getLine(i).translateToString(true));
  return out.join("\\n");
}"""


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not CHROMIUM.exists():
        pytest.skip("Chromium is not installed (make test installs Debian's chromium)")
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            yield b
        finally:
            await b.close()


@pytest.fixture
def pam_sshd(tmp_path: Path) -> Iterator[Sshd]:
    """A password (PAM) sshd that ``USER`` signs in to with ``PASSWORD``."""
    if not sshd_available():
        pytest.skip("needs root and Debian openssh-server")
    ensure_user(USER, PASSWORD)
    with Sshd.running(tmp_path / "sshd", password=True) as sshd:
        yield sshd


@pytest.fixture
async def ssh_signed_in(running: Running, pam_sshd: Sshd) -> tuple[str, str]:
    """Alice granted ``pam_sshd`` as ``db01`` and signed in: (request id, session cookie)."""
    _sd, rid, cookie = await signed_in(running, pam_sshd)
    return rid, cookie


async def on_screen(page: Page, needle: str, terminal: str = "domumTerminal", timeout: float = 15.0) -> str:
    """The text of the xterm.js terminal ``window[terminal]`` once ``needle`` is on it."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = str(await page.evaluate(_BUFFER_TEXT, terminal))
        if needle in text:
            return text
        await page.wait_for_timeout(50)
    raise AssertionError(f"{needle!r} not on {terminal}'s screen:\n{text}")
