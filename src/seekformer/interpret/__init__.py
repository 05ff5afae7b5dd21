"""See inside the model: routing and attention capture (forward hooks), routing statistics over corpora,
expert ablation and router bias, plots. Used by `seekformer inspect`, the serve playground and benchmarks."""

from .capture import Capture, InspectError, LayerRouting, capture, forward_with_capture, moe_layer_ids

__all__ = ["Capture", "InspectError", "LayerRouting", "capture", "forward_with_capture", "moe_layer_ids"]
