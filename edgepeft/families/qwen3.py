"""Qwen3: Qwen2's layer without biases, with an RMSNorm over each head of q and k before rotary."""

from edgepeft.families.common import Family, check_rope

FAMILY = Family(qk_norm=True, check=check_rope)
