"""``edgepeft adapter add`` without transformers and peft: the module table an export records and
the skeleton rebuilt from it, edgepeft's copy of PEFT's target-matching rules, and a LoRA add in a
fresh process that imports neither.

The skeleton must be the base model as the kinds and the fused packing see it: module names and
classes, parameters (ties included) and their shapes, heads and embeddings, the config through its
attribute map, the fused group table. The rules must decide as PEFT decides, on a grid of configs.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgepeft import families
from edgepeft.export.module_table import MODULE_TABLE, skeleton, write_module_table
from edgepeft.kinds import peft_rules
from edgepeft.kinds.common import is_linear
from helpers import ARCHS, FAMILIES, encoder_config, make_adapter, make_base, make_lora

REPO = Path(__file__).resolve().parents[1]


def _causal(arch: str, cfg: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **cfg)).eval()


def _classifier(arch: str):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    with torch.device("meta"):
        return AutoModelForSequenceClassification.from_config(
            AutoConfig.for_model(arch, num_labels=3, **encoder_config(arch))).eval()


def _recorded(model, tmp_path: Path):
    model.config.to_json_file(str(tmp_path / "base_config.json"))
    write_module_table(model, tmp_path)
    return skeleton(tmp_path, {"base": {"config": "base_config.json", "modules": MODULE_TABLE}})


def _view(model) -> dict:
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    name_of = {id(m): n for n, m in model.named_modules()}
    return {"modules": [(n, type(m).__name__ if n else "root", is_linear(m)) for n, m in model.named_modules()],
            "params": [(n, tuple(p.shape)) for n, p in model.named_parameters()],
            "linear_shapes": {n: (m.in_features, m.out_features) for n, m in model.named_modules()
                              if isinstance(m, torch.nn.Linear)},
            "embeddings": (name_of.get(id(in_emb)), name_of.get(id(out_emb)) if out_emb is not None else None),
            "prefix": model.base_model_prefix}


MODELS = ([("causal", a, ARCHS[a]) for a in ("llama", "gpt2", "phi3", "qwen2")]
          + [("family", a, FAMILIES[a]) for a in ("gemma3_text", "gemma3", "qwen3", "smollm3")]
          + [("classifier", a, None) for a in ("bert", "distilbert", "roberta")])


@pytest.mark.parametrize("what,arch,cfg", MODELS, ids=[f"{w}-{a}" for w, a, _ in MODELS])
def test_skeleton_is_the_model_as_adapters_see_it(tmp_path, what, arch, cfg):
    if arch == "gemma3":
        from transformers import AutoConfig, Gemma3ForConditionalGeneration

        with torch.device("meta"):
            model = Gemma3ForConditionalGeneration(AutoConfig.for_model(arch, **cfg)).eval()
    else:
        model = _classifier(arch) if what == "classifier" else _causal(arch, cfg)
    sk = _recorded(model, tmp_path)
    assert _view(sk) == _view(model)
    assert all(p.device.type == "meta" for p in sk.parameters())
    text, got = model.config.get_text_config(), sk.config.get_text_config()
    for attr in ("hidden_size", "num_hidden_layers", "num_attention_heads", "model_type", "vocab_size"):
        assert getattr(got, attr) == getattr(text, attr), attr  # DistilBERT: through its attribute map
    fam = families.REGISTRY.get(model.config.model_type) or families.ENCODERS.get(model.config.model_type)
    if fam is not None:
        assert fam.group_table(sk.config) == fam.group_table(model.config)
    if any(n == "lm_head.weight" for n, _ in model.named_parameters(remove_duplicate=False)) \
            and model.config.get_text_config().tie_word_embeddings:
        assert sk.get_output_embeddings().weight is sk.get_input_embeddings().weight  # tied again


def test_damaged_table_is_refused_by_name(tmp_path):
    from edgepeft.errors import EdgepeftError

    model = _causal("llama", ARCHS["llama"])
    _recorded(model, tmp_path)
    table = json.loads((tmp_path / MODULE_TABLE).read_text())
    table["modules"][3][2] = {"weight": "x"}
    (tmp_path / MODULE_TABLE).write_text(json.dumps(table))
    with pytest.raises(EdgepeftError, match=re.escape(str(tmp_path / MODULE_TABLE)) + ".*damaged"):
        skeleton(tmp_path, {"base": {"config": "base_config.json", "modules": MODULE_TABLE}})
    (tmp_path / MODULE_TABLE).unlink()
    with pytest.raises(EdgepeftError, match="missing"):
        skeleton(tmp_path, {"base": {"config": "base_config.json", "modules": MODULE_TABLE}})
    assert skeleton(tmp_path, {"base": {"config": "base_config.json"}}) is None  # an older artifact


# ------------------------------------------------------------------ PEFT's rules
def _peft(config: dict, names: list[str], kind: str = "lora"):
    """PEFT's decision per module name, or the exception type its config raises."""
    from peft import LoHaConfig, LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    try:
        cfg = (LoraConfig if kind == "lora" else LoHaConfig)(**config)
    except (ValueError, TypeError) as e:
        return type(e).__name__
    out = []
    for n in names:
        hit = check_target_module_exists(cfg, n)
        out.append(peft_rules.EXCLUDED if type(hit).__name__ == "_ExcludedModule" else bool(hit))
    return out


def _ours(config: dict, names: list[str], kind: str = "lora"):
    try:
        peft_rules.check_target_fields(config, regex_layers=kind == "loha")
    except (ValueError, TypeError) as e:
        return type(e).__name__
    return [peft_rules.target_match(config, n) for n in names]


TARGETS = [["q_proj", "v_proj"], ["self_attn.q_proj"], ["model.layers.1.mlp.down_proj", "k_proj"], ["mlp"],
           "q_proj", r".*\.(q|v)_proj", r"model\.layers\.1\..*", ["c_attn"], ["query", "dense"]]
LAYERS = [None, 0, [1], [], [0, 1]]
PATTERNS = [None, "layers", ["h", "layers"], "blocks", ""]
EXCLUDES = [None, r"model\.layers\.0\..*", ["k_proj"], ["layers.1.self_attn.q_proj"]]
SAVED = [None, ["lm_head"], ["score", "classifier"]]


def test_target_rules_decide_as_peft_does():
    names = [n for n, _ in _causal("llama", ARCHS["llama"]).named_modules()]
    names += [n for n, _ in _causal("gpt2", ARCHS["gpt2"]).named_modules()]
    names += [n for n, _ in _classifier("bert").named_modules()]
    for kind, refusals in (("lora", (0.3, 0.7)), ("loha", (0.05, 0.3))):
        checked, refused = 0, 0
        for target, layers, pattern, exclude, saved in itertools.product(TARGETS, LAYERS, PATTERNS, EXCLUDES, SAVED):
            config = {"target_modules": target, "layers_to_transform": layers, "layers_pattern": pattern,
                      "exclude_modules": exclude, "modules_to_save": saved}
            want = _peft(config, names, kind)
            assert _ours(config, names, kind) == want, (kind, config)
            checked += 1
            refused += isinstance(want, str)
        assert checked == 2700 and refusals[0] < refused / checked < refusals[1], (kind, refused)  # both branches


@pytest.mark.parametrize("arch,task", [("llama", None), ("gpt2", None), ("bert", "SEQ_CLS"), ("bert", None)])
def test_all_linear_expands_as_peft_s(tmp_path, arch, task):
    """PEFT's all-linear expansion on the real model equals ours on the model and on its skeleton."""
    from peft import LoHaConfig
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

    model = _classifier(arch) if arch == "bert" else _causal(arch, ARCHS[arch])
    want = set(_maybe_include_all_linear_layers(LoHaConfig(target_modules="all-linear", task_type=task),
                                                model).target_modules)
    for m in (model, _recorded(model, tmp_path)):
        linear = [n for n, x in m.named_modules() if is_linear(x)]
        got = peft_rules.all_linear({"target_modules": "ALL-LINEAR", "task_type": task}, m, linear)["target_modules"]
        assert set(got) == want and len(got) == len(want)
    assert ("lm_head" in want) is False and (arch != "bert" or ("classifier" in want) == (task is None))


def test_pattern_key_is_peft_s():
    from peft.utils.other import get_pattern_key

    keys = ["q_proj", "layers.1.self_attn.v_proj", r"model\.layers\.0\..*", "mlp.down_proj", "proj"]
    names = [n for n, _ in _causal("llama", ARCHS["llama"]).named_modules()]
    for order in (keys, keys[::-1]):
        assert [peft_rules.pattern_key(order, n) for n in names] == [get_pattern_key(order, n) for n in names]


# ------------------------------------------------------------------ the command
def test_lora_and_ia3_add_import_neither_transformers_nor_peft(tmp_path):
    """A fresh process adds a LoRA and an IA3 adapter to fused and traced artifacts; afterwards
    transformers and peft are not in ``sys.modules`` (the check fails as soon as anything on the
    path imports them). That the added adapters compute what a full export computes is
    ``test_lifecycle.py``'s."""
    from edgepeft.export import ExportConfig, export

    base = make_base("llama", tmp_path / "base")
    lora = make_lora(base, tmp_path / "lora", seed=3, r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                     rank_pattern={"down_proj": 2}, alpha_pattern={r"model\.layers\.1\.self_attn\.q_proj": 3})
    ia3 = make_adapter(base, tmp_path / "ia3", "ia3", seed=5, target_modules=["k_proj", "v_proj", "down_proj"],
                       feedforward_modules=["down_proj"])
    roots = []
    for graph in ("fused", "generic"):
        roots.append(tmp_path / graph)
        export(ExportConfig(base=base, out=roots[-1], graph=graph, slots="lora:all-linear,ia3:k_proj,v_proj,down_proj"),
               quiet=True)
    code = ("import sys\nfrom edgepeft.cli import main\n"
            f"codes = [main(['adapter', 'add', r, '--adapter', f'{{n}}={{d}}', '--quiet']) for r in {[str(r) for r in roots]}\n"
            f"         for n, d in (('a', {str(lora)!r}), ('b', {str(ia3)!r}))]\n"
            "heavy = sorted(m for m in ('transformers', 'peft') if m in sys.modules)\n"
            "print(codes, heavy)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "[0, 0, 0, 0] []", r.stdout + r.stderr[-2000:]
