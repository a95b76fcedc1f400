"Shared pytest setup: the `slow` marker (run with `-m slow`; skipped by default unless ICRT_SLOW=1)."
import os

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test (set ICRT_SLOW=1 to run)")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("ICRT_SLOW") == "1": return
    skip = pytest.mark.skip(reason="slow: set ICRT_SLOW=1 to run")
    for it in items:
        if "slow" in it.keywords: it.add_marker(skip)
