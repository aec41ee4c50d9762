"""Without Chromium the browser tests skip with the way to install it; in CI they fail."""

from __future__ import annotations

import pytest

from .conftest import INSTALL, missing_browser


def test_a_missing_browser_skips_with_advice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="scripts/ensure-browser"):
        missing_browser(INSTALL)


def test_a_missing_browser_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="never skipped in CI"):
        missing_browser(INSTALL)
