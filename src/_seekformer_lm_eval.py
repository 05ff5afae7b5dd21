"""Makes `lm_eval --model seekformer` work: lm-evaluation-harness (0.4.x) has no plugin entry point for
models, so seekformer installs `seekformer_lm_eval.pth`, which imports this module at interpreter start.

It costs one cheap check per import and imports nothing itself: it waits until `lm_eval.models` (the
package lm-eval imports to fill its model registry) has been executed, then adds a lazy
"module:Class" entry for `seekformer`. Neither lm-eval nor seekformer (nor torch) is imported unless
the program imports lm-eval anyway. Set SEEKFORMER_NO_LM_EVAL_HOOK=1 to switch it off.
"""

import os
import sys
from importlib.machinery import PathFinder

WATCHED = "lm_eval.models"
MODEL_NAME = "seekformer"
MODEL_TARGET = "seekformer.evaluation.lm_eval_adapter:SeekformerLM"


def register() -> None:
    """Add the lazy `seekformer` entry to lm-eval's model registry (idempotent, never raises)."""
    try:
        from lm_eval.api.registry import model_registry

        if MODEL_NAME not in model_registry:
            model_registry.register(MODEL_NAME, target=MODEL_TARGET)
    except Exception:  # an lm-eval whose registry looks different: leave it alone
        pass


class _RegisterAfterImport:
    """A meta path finder (not subclassing importlib.abc, whose import costs ~20 ms at every start):
    finds `lm_eval.models` like the normal path finder would, and registers once it has run."""

    def find_spec(self, fullname, path, target=None):
        if fullname != WATCHED:
            return None
        spec = PathFinder.find_spec(fullname, path, target)
        loader = getattr(spec, "loader", None)
        if spec is None or not hasattr(loader, "exec_module"):
            return spec
        original = loader.exec_module

        def exec_module(module):
            original(module)
            register()

        loader.exec_module = exec_module  # the loader object belongs to this spec alone
        return spec


def install() -> None:
    if os.environ.get("SEEKFORMER_NO_LM_EVAL_HOOK"):
        return
    if WATCHED in sys.modules:  # lm-eval already loaded (e.g. this module imported late)
        register()
        return
    if not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


install()
