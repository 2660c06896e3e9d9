"""Fixtures of the report tests (helpers in report_helpers.py)."""
import pytest

from report_helpers import Browser, find_chromium


@pytest.fixture(scope="session")
def browser():
    pytest.importorskip("websocket", reason="websocket-client is not installed: pip install -e '.[test]'")
    binary = find_chromium()
    if binary is None:
        pytest.skip("no Chromium on this machine (CI installs Debian's chromium: apt-get install -y chromium)")
    b = Browser(binary)
    yield b
    b.close()
