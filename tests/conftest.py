"""Shared test set-up: integration tests need root, BPF and network namespaces.

Without them they skip with the reason, except under CI (CI=true), where a skip would hide a
broken machine set-up and is turned into a failure.
"""

from __future__ import annotations

import os
import shutil

import pytest

_TOOLS = ("ip", "tcpdump", "tshark", "curl", "nginx")


def _privileged_reason() -> str | None:
    if os.geteuid() != 0:
        return "integration tests need root (network namespaces, BPF)"
    missing = [t for t in _TOOLS
               if shutil.which(t) is None and not os.path.exists(f"/usr/sbin/{t}")]
    if missing:
        return f"integration tests need {', '.join(missing)} (run 'make setup')"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _privileged_reason()
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
            if reason:
                if os.environ.get("CI") == "true":
                    item.add_marker(pytest.mark.usefixtures("_fail_in_ci"))
                else:
                    item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def _fail_in_ci() -> None:
    pytest.fail(f"under CI integration tests must run, not skip: {_privileged_reason()}")
