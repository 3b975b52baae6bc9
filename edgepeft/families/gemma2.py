"""Gemma 2: Gemma 3's layer without the q/k norms, one rotary base, and soft-capped attention
and final logits (``attn_logit_softcapping``, ``final_logit_softcapping``)."""

from edgepeft.families.common import Family, check_rope
from edgepeft.families.gemma3 import NORMS

FAMILY = Family(norms=NORMS, norm_offset=1.0, check=check_rope,
                scale=lambda cfg: float(cfg.query_pre_attn_scalar) ** -0.5,
                embed_scale=lambda cfg: float(cfg.hidden_size) ** 0.5,
                softcaps=("attn_logit_softcapping", "final_logit_softcapping"))
