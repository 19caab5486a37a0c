import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.getchu_site import CASCADE, FACES, ILLUSTRATIONS, MONTH_DIR

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def shared_data_present():
    for path in (CASCADE, FACES, ILLUSTRATIONS, MONTH_DIR):
        if not path.exists():
            pytest.exit(f"{path} is missing: the tests read real data from ../shared beside the checkout")


def run_module(module: str, *overrides: str, check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run `python -m <module> k=v ...` from the project root, as `make` does."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", module, *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc
