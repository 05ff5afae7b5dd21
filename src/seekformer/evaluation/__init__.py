"""Evaluation: task metrics (metrics.py), perplexity, multiple-choice knowledge tests, ...

Names are re-exported lazily so that importing the package stays cheap; modules add their exports to
`_EXPORTS` (name -> submodule).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "classification_metrics": "metrics",
    "tagging_metrics": "metrics",
    "generation_metrics": "metrics",
    "qa_metrics": "metrics",
    "evaluate_task": "metrics",
    "predict_task": "metrics",
}
_EXPORTS.update({  # perplexity.py, multiple_choice.py (lm_eval_adapter.py is imported on demand: it needs lm-eval)
    "evaluate_perplexity": "perplexity",
    "PerplexityResult": "perplexity",
    "score_tokens": "..inference.scoring",  # the one scorer lives in inference/ (serving uses it too)
    "loglikelihood": "..inference.scoring",
    "next_token_logprobs": "..inference.scoring",
    "perplexity_documents": "perplexity",
    "evaluate_multiple_choice": "multiple_choice",
    "read_questions": "multiple_choice",
    "build_prompt": "multiple_choice",
    "Question": "multiple_choice",
    "MCResult": "multiple_choice",
})

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        mod = _EXPORTS[name]
        return getattr(importlib.import_module(mod if mod.startswith(".") else f".{mod}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
