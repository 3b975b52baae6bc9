"""The descriptions validate, bench and train read from each kind file: ``REFERENCE``
(:class:`Reference`) and ``TRAIN`` (:class:`TrainSpec`), their checks, and what is derived from
them (``kinds.TRAIN``, ``mix_group``, ``contract.mixes``). Fast: no model is loaded."""

from __future__ import annotations

import pytest

from edgepeft import kinds
from edgepeft.contract import head_input_name, mixes
from edgepeft.kinds.common import Reference, TrainSpec, peft_add, peft_load, peft_select


def test_every_kind_describes_its_reference_and_training():
    for module in set(kinds.REGISTRY.values()):
        assert isinstance(module.REFERENCE, Reference), module.__name__
        assert all(isinstance(s, TrainSpec) for s in module.TRAIN.values()), module.__name__
    # the CLI's --kind choices, in the order they always had (kinds added since come after them)
    first = ["lora", "dora", "ia3", "prompt", "prefix", "bottleneck"]
    assert list(kinds.TRAIN)[:len(first)] == first
    assert {k: kinds.TRAIN[k].lr for k in first} == {
        "lora": 1e-3, "dora": 1e-3, "ia3": 3e-3, "prompt": 3e-2, "prefix": 1e-2, "bottleneck": 1e-3}


@pytest.mark.parametrize("make, words", [
    (lambda: Reference(load=None), "Reference.load: expected a function"),
    (lambda: Reference(load=peft_load, add=peft_add), "add and select together"),
    (lambda: Reference(load=peft_load, shared=True), "shared needs add"),
    (lambda: Reference(load=peft_load, add=peft_add, select=peft_select, mix=peft_add), "mix needs shared"),
    (lambda: Reference(load=peft_load, combine=peft_add), "combine needs add"),
    (lambda: TrainSpec(lr=0, peft_config=peft_load), "TrainSpec.lr"),
    (lambda: TrainSpec(lr=1e-3), "exactly one of peft_config"),
    (lambda: TrainSpec(lr=1e-3, add=peft_add), "add and save together"),
    (lambda: TrainSpec(lr=1e-3, peft_config=peft_load, tasks=("causal-lm",)), "refusal"),
    (lambda: TrainSpec(lr=1e-3, peft_config=peft_load, tasks=("lm",), refusal="no"), "TrainSpec.tasks"),
])
def test_description_checks(make, words):
    with pytest.raises(ValueError, match=words):
        make()


def _manifest():
    """A side manifest with a LoRA pair (one with a head), DoRA, a bottleneck and a prefix."""
    rules = {"lora.q.A": "cat0", "lora.q.B": "cat1w", "dora.q.mag": "one", "bottleneck_relu.o.up": "cat1w",
             head_input_name("classifier.weight"): "one"}
    entry = {"head": [], "prefix": None}
    return {"inputs": {k: {"mix": r} for k, r in rules.items()}, "adapters": {
        "bn": {**entry, "kind": "bottleneck", "inputs": ["bottleneck_relu.o.up"]},
        "a": {**entry, "kind": "lora", "inputs": ["lora.q.A", "lora.q.B"]},
        "d": {**entry, "kind": "dora", "inputs": ["dora.q.mag"]},
        "h": {**entry, "kind": "lora", "inputs": ["lora.q.A", "lora.q.B", head_input_name("classifier.weight")],
              "head": ["classifier.weight"]},
        "p": {**entry, "kind": "prefix", "inputs": [], "prefix": {"length": 2, "from_prompt": False}}}}


def test_mixes_and_the_mix_group():
    m = _manifest()
    assert [n for n in m["adapters"] if mixes(m, n)] == ["bn", "a", "h"]  # by the manifest's rules
    assert kinds.mix_group(m) == ["a", "h"]  # ... and with a PyTorch mix reference: LoRA's
