"""Fused causal-LM artifacts that onnxruntime-genai runs (``edgepeft.export.genai``).

Per family (a tiny config of each from ``helpers.FAMILIES``, with every feature its description
covers): two LoRA adapters of different ranks and targets, exported once as a fused fp32 artifact
with ``edgepeft export --mix-adapter`` writing a 0.7/0.3 mix as a third adapter file. Through
onnxruntime-genai's Python API (the C++ core of its mobile packages): greedy tokens for the base,
each adapter and the mix, switching adapters between generations on one model, equal to
edgepeft's own runtime on the same prompts (the mix: a per-call mix). An artifact with a non-LoRA
kind, or on the traced graph, is reported not ready and holds no onnxruntime-genai files.
"""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import onnxruntime_genai as og
import pytest

from edgepeft.cli import main
from edgepeft.contract import verify
from edgepeft.contract.names import GENAI_CONFIG, GENAI_GRAPH
from edgepeft.export import ExportConfig, export
from edgepeft.quantize import QuantConfig
from edgepeft.runtime import Model
from helpers import FAMILIES, VOCAB, linear_leaves, make_adapter, make_family_base, make_lora

# Every family of the fused graph (edgepeft.families): onnxruntime-genai runs each tiny fused export
# token for token like edgepeft's runtime. Sliding windows of 4 (mistral, gemma2/3) against prompts
# of 5-9 tokens and 16 generated; gemma3: the text tower of the multimodal config.
ARCHS = sorted(FAMILIES)
PROMPTS = [[5, 9, 17, 33, 4], [40, 7, 7, 61, 12, 3, 88, 21, 50]]
NEW = 16
# onnxruntime-genai activates one adapter at a time: (og adapter name, edgepeft's choice)
CHOICES = [("a", "a"), (None, None), ("b", "b"), ("mix", {"a": 0.7, "b": 0.3}), ("a", "a")]


@pytest.fixture(scope="module", params=ARCHS)
def artifact(request, tmp_path_factory):
    arch = request.param
    root = tmp_path_factory.mktemp(f"genai-{arch}")
    base = make_family_base(arch, root / "base")
    for f in ("config.json", "generation_config.json"):  # an EOS id, as real bases have (tiny configs: none or 1-2)
        cfg = json.loads((base / f).read_text())
        cfg["eos_token_id"] = VOCAB - 1  # rarely drawn, so most generations run their 16 tokens
        (base / f).write_text(json.dumps(cfg))
    leaves = linear_leaves(base)
    some, every = leaves[:3], "all-linear"
    if arch == "gemma3":  # the text tower's projections only (the vision tower is not exported)
        leaves = [x for x in leaves if x.endswith("_proj") and x != "out_proj"]
        some, every = rf".*language_model.*\.({'|'.join(leaves[:3])})", rf".*language_model.*\.({'|'.join(leaves)})"
    a = make_lora(base, root / "a", r=4, lora_alpha=8, target_modules=some)
    b = make_lora(base, root / "b", seed=2, r=6, lora_alpha=12, use_rslora=True, target_modules=every,
                  rank_pattern={leaves[-1]: 3})
    out = root / "fused"
    assert main(["export", str(base), "--adapter", f"a={a}", "--adapter", f"b={b}", "--graph", "fused",
                 "--mix-adapter", "mix=a:0.7,b:0.3", "--out", str(out), "--quiet"]) == 0
    return out


def _og_tokens(model, adapters, name, prompt) -> list[int]:
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + NEW, do_sample=False)
    gen = og.Generator(model, params)
    if name is not None:
        gen.set_active_adapter(adapters, name)
    gen.append_tokens(prompt)
    while not gen.is_done():
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)][len(prompt):]


def _edgepeft_tokens(m: Model, choice, prompt) -> list[int]:
    out = m.generate(np.array([prompt]), NEW, choice)[0].tolist()[len(prompt):]
    eos = m.manifest["base"]["eos_token_id"]
    return out[:out.index(eos)] if eos in out else out  # onnxruntime-genai stops at EOS, which it leaves out


def test_genai_greedy_equals_edgepeft(artifact):
    """One onnxruntime-genai model, adapters switched between generations: base, each adapter and
    the exported mix give edgepeft's greedy tokens on every prompt."""
    model = og.Model(str(artifact))
    adapters = og.Adapters(model)
    for name in ("a", "b", "mix"):
        adapters.load(str(artifact / "adapters" / f"{name}.onnx_adapter"), name)
    m = Model(artifact)
    for prompt in PROMPTS:
        seen = set()
        for name, choice in CHOICES:
            ours = _edgepeft_tokens(m, choice, prompt)
            assert len(ours) > 2
            theirs = _og_tokens(model, adapters, name, prompt)
            assert theirs == ours, (name, prompt)
            seen.add(tuple(theirs))
        assert len(seen) == 4, "base, a, b and the mix should continue the prompt differently"


def test_genai_files(artifact, capsys):
    """genai.onnx holds no weights (its initializers point at the fused graph's data file), the
    manifest records both files, verify checks them, inspect says ready."""
    m = json.loads((artifact / "manifest.json").read_text())
    assert m["genai"]["ready"] and [f["file"] for f in m["genai"]["files"]] == [GENAI_GRAPH, GENAI_CONFIG]
    proto = onnx.load(str(artifact / GENAI_GRAPH), load_external_data=False)
    external = {e.value for i in proto.graph.initializer for e in i.external_data if e.key == "location"}
    assert external == {m["graph"]["data_file"]}
    assert (artifact / GENAI_GRAPH).stat().st_size < (artifact / "model.onnx").stat().st_size + 4096
    cfg = json.loads((artifact / GENAI_CONFIG).read_text())
    assert cfg["model"]["decoder"]["filename"] == GENAI_GRAPH and cfg["search"]["past_present_share_buffer"]
    assert m["adapters"]["mix"]["mix_of"] == {"a": 0.7, "b": 0.3}
    assert verify(artifact) == []
    assert main(["inspect", str(artifact)]) == 0
    assert "onnxruntime-genai: ready (genai.onnx, genai_config.json)" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["ia3-fused", "lora-traced"])
def test_not_ready_has_no_genai_files(case, llama_base, llama_adapters, tmp_path, capsys):
    """A kind that is not LoRA-family (IA3 scales on the fused graph), or the traced graph: no
    genai_config.json, no genai.onnx, and inspect says why."""
    if case == "ia3-fused":
        adapter, graph = make_adapter(llama_base, tmp_path / "ia3", "ia3", seed=4), "fused"
        reason = r"adapter 'x' \(ia3\) feeds scale\.\d+\.\w+\.\w+, not a low-rank \(LoRA\) input"
    else:
        adapter, graph = llama_adapters["chat"], "generic"
        reason = r"not the fused graph"
    out = tmp_path / "out"
    export(ExportConfig(base=llama_base, out=out, adapters=(("x", adapter),), graph=graph), quiet=True)
    assert not (out / GENAI_CONFIG).exists() and not (out / GENAI_GRAPH).exists()
    assert Model(out).fused == (graph == "fused")
    assert main(["inspect", str(out)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("onnxruntime-genai:"))
    assert re.fullmatch(rf"onnxruntime-genai: not ready \({reason}.*\)", line), line
    with pytest.raises(RuntimeError):
        og.Model(str(out))


def test_genai_int4(llama_base, llama_adapters, tmp_path):
    """int4 with the fast options (8-bit head and table, int8 compute): onnxruntime-genai runs the
    same quantized kernels, so its greedy tokens equal edgepeft's, adapter by adapter."""
    out = tmp_path / "int4"
    export(ExportConfig(base=llama_base, out=out, adapters=tuple(llama_adapters.items()), graph="fused",
                        quant=QuantConfig(precision="int4", accuracy_level=4, head_bits=8)), quiet=True)
    model = og.Model(str(out))
    adapters = og.Adapters(model)
    for name in llama_adapters:
        adapters.load(str(out / "adapters" / f"{name}.onnx_adapter"), name)
    m = Model(out)
    for prompt in PROMPTS:
        for name in (None, *llama_adapters, None):
            assert _og_tokens(model, adapters, name, prompt) == _edgepeft_tokens(m, name, prompt), (name, prompt)


def test_genai_cpu_arm64_target(llama_base, llama_adapters, tmp_path):
    """The phone CPU profile (cpu-arm64: int4, an .ort bundle) writes onnxruntime-genai's files by
    default, and onnxruntime-genai gives edgepeft's greedy tokens on them."""
    out = tmp_path / "arm64"
    assert main(["export", str(llama_base), *[a for n, d in llama_adapters.items() for a in ("--adapter", f"{n}={d}")],
                 "--target", "cpu-arm64", "--out", str(out), "--quiet"]) == 0
    assert (out / GENAI_CONFIG).is_file() and (out / GENAI_GRAPH).is_file()
    model = og.Model(str(out))
    adapters = og.Adapters(model)
    name = next(iter(llama_adapters))
    adapters.load(str(out / "adapters" / f"{name}.onnx_adapter"), name)
    m = Model(out)
    for prompt in PROMPTS:
        for choice in (None, name):
            assert _og_tokens(model, adapters, choice, prompt) == _edgepeft_tokens(m, choice, prompt), (choice, prompt)
