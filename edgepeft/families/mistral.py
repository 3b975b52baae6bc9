"""Mistral: Llama's layer with a sliding attention window on every layer (``sliding_window``)."""

from edgepeft.families.common import Family, check_rope

FAMILY = Family(check=check_rope)
