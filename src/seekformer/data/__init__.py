"""Text corpora -> documents -> packed token shards -> training batches.

* `corpus`: `iter_documents(sources)` streams documents from files, directories, "builtin", "hf:NAME".
* `shards`: `build_shards(...)` tokenizes into memory-mapped shards; `ShardSet`, `PackedBatches`
  (the resumable training loader) and `iter_eval_batches`.
* `builtin`: the small datasets shipped with the package.

Names are re-exported lazily, so `import seekformer.data.builtin` stays free of numpy and torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "iter_documents": "corpus",
    "iter_document_pieces": "corpus",
    "check_sources": "corpus",
    "build_shards": "shards",
    "ShardSet": "shards",
    "PackedBatches": "shards",
    "iter_eval_batches": "shards",
    "token_dtype": "shards",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
