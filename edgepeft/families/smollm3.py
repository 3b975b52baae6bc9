"""SmolLM3: Llama's layer, without rotary on the layers ``no_rope_layers`` marks 0 (NoPE, every
fourth layer in the released checkpoints)."""

from edgepeft.families.common import Family, Layer, check_rope, window_layers


def layers(cfg) -> list[Layer]:
    use_rope = cfg.no_rope_layers
    return [Layer(layer.window, layer.rope if use_rope[i] else None)
            for i, layer in enumerate(window_layers(cfg))]


FAMILY = Family(layers=layers, check=check_rope)
