"""The kind registry: every kind declares the same protocol, unknown kinds are errors, and shared
code reads the declarations instead of naming kinds."""

import ast
from pathlib import Path

import numpy as np
import pytest

from edgepeft import kinds
from edgepeft.errors import EdgepeftError
from edgepeft.kinds.common import SideBranch

PACKAGE = Path(kinds.__file__).resolve().parents[1]
PROTOCOL = ("NAMES", "FEATURES", "MERGEABLE", "read", "merge", "side", "manifest_entry", "describe", "REFERENCE",
            "TRAIN")
# Where a kind or feature name may still appear outside edgepeft/kinds/, and why.
ALLOWED = {
    # The fused graph's low-rank inputs keep their artifact names (lora.{layer}.{group}.AT / .BT);
    # kinds opt in with a fused form (Feature.fused, contract.features.FUSED_FORMS).
    "export/fused_layout.py": {"lora"},
    # OpenAI's request field for the text to complete, not prompt tuning.
    "serve/app.py": {"prompt"},
}


def test_every_kind_module_declares_the_protocol():
    for peft_type, module in kinds.REGISTRY.items():
        missing = [a for a in PROTOCOL if not hasattr(module, a)]
        assert not missing, f"{peft_type}: {module.__name__} lacks {missing}"
        assert module.NAMES and all(isinstance(n, str) for n in module.NAMES)
        for f in module.FEATURES:
            assert kinds.FEATURES[f.name] is f


def test_names_and_features_are_unique_across_kinds():
    modules = list(dict.fromkeys(kinds.REGISTRY.values()))
    names = [n for m in modules for n in m.NAMES]
    features = [f.name for m in modules for f in m.FEATURES]
    assert len(names) == len(set(names)) and len(features) == len(set(features))


def test_unknown_kind_and_feature_are_errors():
    with pytest.raises(EdgepeftError, match="'nope' is not known"):
        kinds.kind_module("nope")
    with pytest.raises(EdgepeftError, match="feature 'nope' is not known"):
        kinds.feature("nope")


def test_a_side_branch_with_an_unknown_feature_is_refused(llama_base):
    from transformers import AutoModelForCausalLM

    from edgepeft.export.slots import plan_slots

    model = AutoModelForCausalLM.from_pretrained(llama_base)
    module = next(n for n, _ in model.named_modules() if n.endswith("q_proj"))
    side = SideBranch(layers={(module, "bottleneck_tanh"): {"down": np.zeros((1, 4), np.float32)}})
    with pytest.raises(EdgepeftError, match="bottleneck_tanh"):
        plan_slots(model, [side])


def _string_constants(path: Path):
    """String literals of a file, except field names (``d["prefix"]``, ``d.get("prefix")``, dict
    keys): a manifest field may share a word with a kind (the KV-cache seed ``prefix``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    fields = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript):
            fields.add(id(node.slice))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get" \
                and node.args:
            fields.add(id(node.args[0]))
        elif isinstance(node, ast.Dict):
            fields.update(id(k) for k in node.keys if k is not None)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in fields:
            yield node.lineno, node.value


def test_shared_code_names_no_kind():
    """Quoted kind and feature names appear only in edgepeft/kinds/ (and the listed exceptions)."""
    names = set(kinds.BY_NAME) | set(kinds.FEATURES) | {t.lower() for t in kinds.REGISTRY}
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith(("kinds/", "demo/")):
            continue
        allowed = ALLOWED.get(rel, set())
        found += [f"{rel}:{line}: {value!r}" for line, value in _string_constants(path)
                  if value in names and value not in allowed]
    assert not found, "shared code names kinds:\n" + "\n".join(found)
