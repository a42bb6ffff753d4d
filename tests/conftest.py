import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# CI (.ci/run) installs SLURM first and sets this: there a skipped SLURM test is a failure.
REQUIRE_SLURM = os.environ.get("FTLAUNCH_REQUIRE_SLURM") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_SLURM and report.skipped and not hasattr(report, "wasxfail") and item.get_closest_marker("slurm"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped, but FTLAUNCH_REQUIRE_SLURM=1 requires the SLURM tests to run: {reason}"
