"""Phi-3 / Phi-4-mini: q|k|v and gate|up stored packed (``qkv_proj``, ``gate_up_proj``), so a
LoRA on them is already in the graph's packed groups; partial rotary (Phi-4-mini rotates 3/4 of
each head: the rotary tables are that wide); LongRoPE tables up to the original context."""

from edgepeft.families.common import Family, check_rope

GROUPS = {"qkv": ("self_attn.qkv_proj",), "o": ("self_attn.o_proj",),
          "gate_up": ("mlp.gate_up_proj",), "down": ("mlp.down_proj",)}

FAMILY = Family(groups=GROUPS, check=check_rope)
