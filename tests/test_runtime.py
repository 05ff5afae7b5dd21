"""Process-level CPU settings: the OpenMP wait policy seekformer picks before torch loads."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = ("import os, seekformer; from seekformer.runtime import prefer_passive_openmp; "
         "before = os.environ.get('GOMP_SPINCOUNT'); ok = prefer_passive_openmp(); "
         "print(before, ok, os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))")


def _run(code: str, **env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**clean, **env})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_short_spin_by_default_and_passive_for_the_server():
    assert _run(PROBE) == ["1000", "True", "PASSIVE", "None"]


def test_user_settings_win():
    assert _run(PROBE, OMP_WAIT_POLICY="ACTIVE") == ["None", "False", "ACTIVE", "None"]
    assert _run(PROBE, GOMP_SPINCOUNT="5") == ["5", "False", "None", "5"]


def test_too_late_once_torch_is_loaded():
    assert _run("import torch; " + PROBE) == ["1000", "False", "None", "1000"]
