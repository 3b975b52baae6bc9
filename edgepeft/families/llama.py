"""Llama 2 / 3.x (llama3 rope scaling), SmolLM2, TinyLlama and checkpoints of that shape:
RMSNorm, rotary on every layer, SiLU-gated MLP, optional biases."""

from edgepeft.families.common import Family, check_rope

FAMILY = Family(check=check_rope)
