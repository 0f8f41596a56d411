"""Run the real `farm` CLI in a subprocess against a farm's settings (its `FARM_*` environment)."""

from __future__ import annotations

import subprocess
import sys

from farm.settings import FarmSettings, settings_env


def run_cli(
    settings: FarmSettings, *args: object, timeout: float = 120, **env: str
) -> subprocess.CompletedProcess[str]:
    """`python -m farm ARGS…` with `settings` (and `env`) in its environment, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "farm", *map(str, args)],
        env=settings_env(settings) | env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
