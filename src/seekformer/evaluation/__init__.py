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
    "score_tokens": "perplexity",
    "loglikelihood": "perplexity",
    "next_token_logprobs": "perplexity",
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
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
