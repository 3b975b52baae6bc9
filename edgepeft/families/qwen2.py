"""Qwen2 / Qwen2.5: Llama's layer with q/k/v biases; with ``use_sliding_window``, the layers from
``max_window_layers`` on attend within ``sliding_window`` (HF's ``layer_types``)."""

from edgepeft.families.common import Family, check_rope

FAMILY = Family(check=check_rope)
