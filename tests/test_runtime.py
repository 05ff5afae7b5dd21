"""Process-level CPU settings: the OpenMP wait policy the CLI picks before torch loads; `import seekformer`
changes nothing."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = ("import os, seekformer; from seekformer.runtime import default_openmp_spin, prefer_passive_openmp; "
         "imported = os.environ.get('GOMP_SPINCOUNT'); spin = default_openmp_spin(); "
         "before = os.environ.get('GOMP_SPINCOUNT'); ok = prefer_passive_openmp(); "
         "print(imported, spin, before, ok, os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))")


def _run(code: str, **env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "SEEKFORMER_OPENMP_DEFAULTED")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**clean, **env})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_import_changes_nothing_the_cli_spins_briefly_and_the_server_is_passive():
    assert _run(PROBE) == ["None", "True", "1000", "True", "PASSIVE", "None"]


def test_user_settings_win():
    assert _run(PROBE, OMP_WAIT_POLICY="ACTIVE") == ["None", "False", "None", "False", "ACTIVE", "None"]
    assert _run(PROBE, GOMP_SPINCOUNT="5") == ["5", "False", "5", "False", "None", "5"]


def test_too_late_once_torch_is_loaded():
    assert _run("import torch; " + PROBE) == ["None", "False", "None", "False", "None", "None"]


def test_the_cli_sets_the_spin_before_torch_loads():
    code = ("import os, sys; from seekformer.cli import main; sys.argv = ['seekformer', 'version']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\nprint(os.environ.get('GOMP_SPINCOUNT'))")
    assert _run(code)[-1] == "1000"


def test_decode_threads_policy():
    """"auto" measures the thread count of few-row decode steps once per model; the tokens do not change
    and torch's own setting is restored after each step."""
    import pytest
    import torch

    from seekformer import runtime
    from seekformer.inference.decoding import step_threads

    from .test_inference import tiny_model

    model = tiny_model()
    budget = torch.get_num_threads()
    want = model.generate([[5, 6, 7]], max_new_tokens=8, ignore_eos=True)
    try:
        runtime.set_decode_threads("auto")
        got = model.generate([[5, 6, 7]], max_new_tokens=8, ignore_eos=True)
        assert torch.get_num_threads() == budget
        assert model.__dict__["_decode_threads"][budget] in (1, budget)
        assert step_threads(model, runtime.FEW_ROW_TOKENS + 1) is None  # wide steps keep torch's count
        runtime.set_decode_threads(1)
        assert step_threads(model, 1) == 1
        with pytest.raises(ValueError):
            runtime.set_decode_threads(0)
    finally:
        runtime.set_decode_threads(None)
    assert torch.equal(got, want)
    assert runtime.fastest_threads(lambda: None, [1]) == 1
