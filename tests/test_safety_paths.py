"""Untrusted files may not reach outside the artifact, run code, or smuggle NaN/Inf into an export.

- Paths: every path a manifest names, an ONNX external-data ``location`` and a symlink inside the
  artifact must resolve inside it; ``..``, absolute paths and symlinks out are refused.
- Pickles: a legacy ``adapter_model.bin`` is read with ``weights_only=True``; one whose unpickling
  would run a command is refused and the command never runs.
- NaN / Inf: every adapter kind (and a carried classification head) is refused at export, naming
  the tensor.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest

from helpers import CLASSIFIER_HEADS, VOCAB, make_adapter, make_bottleneck, make_encoder
from edgepeft.kinds import read_adapter
from edgepeft.cli import main
from edgepeft.errors import EdgepeftError
from edgepeft.export.base import load_causal_lm, load_classifier
from edgepeft.runtime import Model
from edgepeft.contract import sha256_file, verify


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit(art: Path, change) -> None:
    m = json.loads((art / "manifest.json").read_text())
    change(m)
    (art / "manifest.json").write_text(json.dumps(m))


# ---------------------------------------------------------------- manifest paths
OUTSIDE = ["../outside.onnx_adapter", "/etc/passwd", "adapters/../../outside.onnx_adapter",
           "adapters/../../../../../../etc/hostname"]


def _set(path: tuple, value):
    def change(m):
        d = m
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
    return change


@pytest.mark.parametrize("field", [("graph", "file"), ("graph", "data_file"), ("adapters", "chat", "file"),
                                   ("tokenizer", "dir")])
@pytest.mark.parametrize("rel", OUTSIDE)
def test_manifest_paths_outside_are_refused(llama_side, tmp_path, field, rel):
    art = _copy(llama_side, tmp_path / "art")
    shutil.copy(art / "adapters" / "chat.onnx_adapter", tmp_path / "outside.onnx_adapter")
    _edit(art, _set(field, rel))
    with pytest.raises(EdgepeftError, match="outside the artifact directory") as e:
        Model(art).generate_text("w5", max_new_tokens=1)
    assert "manifest.json" in str(e.value)
    if field[0] != "tokenizer":  # verify lists the escape as a problem instead of reading the file
        assert any("outside the artifact directory" in p for p in verify(art))
    if field[0] == "graph":  # inspect stats the graph files
        assert main(["inspect", str(art)]) == 2


@pytest.mark.parametrize("what", ["adapters/chat.onnx_adapter", "model.onnx", "model.onnx.data", "tokenizer",
                                  "adapters"])
def test_symlinks_out_of_the_artifact_are_refused(llama_side, tmp_path, what):
    """A symlink inside the artifact that points outside it (even to an identical copy) is refused."""
    art = _copy(llama_side, tmp_path / "art")
    outside = tmp_path / "elsewhere" / Path(what).name
    outside.parent.mkdir()
    os.replace(art / what, outside)
    (art / what).symlink_to(outside, target_is_directory=outside.is_dir())
    with pytest.raises(EdgepeftError, match="outside the artifact directory"):
        Model(art).generate_text("w5", max_new_tokens=1)


def test_symlinks_inside_the_artifact_are_fine(llama_side, tmp_path):
    art = _copy(llama_side, tmp_path / "art")
    os.replace(art / "adapters" / "chat.onnx_adapter", art / "chat.bin")
    (art / "adapters" / "chat.onnx_adapter").symlink_to(art / "chat.bin")
    assert Model(art).logits([[5, 6]], adapter="chat").shape == (1, 2, VOCAB)


def _set_external_locations(onnx_file: Path, location: str) -> None:
    import onnx

    proto = onnx.load(str(onnx_file), load_external_data=False)
    hits = 0
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value, hits = location, hits + 1
    assert hits
    onnx.save(proto, str(onnx_file))


@pytest.mark.parametrize("location", ["../outside.data", "/tmp/outside.data", "sub/../../outside.data",
                                      "link.data"])
def test_onnx_external_data_outside_is_refused(llama_side, tmp_path, location):
    """The ``location`` of external tensors is checked before onnxruntime opens the graph, even when
    the manifest's checksum was updated to match the edited graph."""
    art = _copy(llama_side, tmp_path / "art")
    shutil.copy(art / "model.onnx.data", tmp_path / "outside.data")
    (art / "link.data").symlink_to(tmp_path / "outside.data")
    _set_external_locations(art / "model.onnx", location)
    _edit(art, _set(("graph", "sha256"), sha256_file(art / "model.onnx")))
    with pytest.raises(EdgepeftError, match=r"model.onnx: external data location .* points outside"):
        Model(art)


def test_external_data_locations_are_found_in_subgraphs(tmp_path):
    """Initializers of If / Loop bodies are walked too (the reader needs no onnx package)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgepeft.runtime.onnx_proto import external_data_locations

    def body(name):
        t = numpy_helper.from_array(np.ones(300, np.float32), f"w_{name}")
        t.data_location = TensorProto.EXTERNAL
        t.ClearField("raw_data")
        t.external_data.add(key="location", value=f"../{name}.bin")
        out = helper.make_tensor_value_info(f"o_{name}", TensorProto.FLOAT, [300])
        return helper.make_graph([helper.make_node("Identity", [f"w_{name}"], [f"o_{name}"])], name, [], [out], [t])

    cond = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [300])
    node = helper.make_node("If", ["c"], ["y"], then_branch=body("then"), else_branch=body("else"))
    model = helper.make_model(helper.make_graph([node], "g", [cond], [y]))
    onnx.save(model, str(tmp_path / "m.onnx"))
    assert sorted(external_data_locations(tmp_path / "m.onnx")) == ["../else.bin", "../then.bin"]
    (tmp_path / "bad.onnx").write_bytes((tmp_path / "m.onnx").read_bytes()[:-7])
    with pytest.raises(EdgepeftError, match="not a valid ONNX file"):
        external_data_locations(tmp_path / "bad.onnx")


def test_adapter_names_stay_plain(llama_base, llama_adapters, tmp_path, capsys):
    for name in ("../x", "/abs", "a/b", ".hidden", "", "x" * 65, "a\\b"):
        code = main(["export", str(llama_base), "--adapter", f"{name}={llama_adapters['chat']}",
                     "--out", str(tmp_path / "out"), "--quiet"])
        err = capsys.readouterr().err
        assert code == 2, (name, err)
        assert "not allowed" in err or "expected NAME=DIR" in err, err
    assert not (tmp_path / "out").exists()


def test_manifest_adapter_names_stay_plain(llama_side, tmp_path):
    art = _copy(llama_side, tmp_path / "art")
    _edit(art, lambda m: m["adapters"].__setitem__("../../evil", m["adapters"].pop("chat")))
    with pytest.raises(EdgepeftError, match=r"adapter name '\.\./\.\./evil' is not allowed"):
        Model(art)


# ---------------------------------------------------------------- pickles
class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_by_export_and_runs_nothing(llama_base, llama_adapters, tmp_path, capsys):
    """A legacy .bin adapter whose unpickling would run a command: refused (exit 2), no command run."""
    marker = tmp_path / "pwned"
    ad = _copy(llama_adapters["chat"], tmp_path / "ad")
    (ad / "adapter_model.safetensors").unlink()
    with open(ad / "adapter_model.bin", "wb") as f:
        pickle.dump({"base_model.model.x.lora_A.weight": _Evil(marker)}, f)
    code = main(["export", str(llama_base), "--adapter", f"chat={ad}", "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "adapter_model.bin: refused to load" in err and "weights_only=True" in err, err
    with pytest.raises(EdgepeftError, match="refused to load"):
        read_adapter("chat", ad, load_causal_lm(llama_base))
    assert not marker.exists()
    assert not (tmp_path / "out").exists()
    # Control: the same payload unpickled without weights_only does run the command.
    with open(ad / "adapter_model.bin", "rb") as f:
        pickle.load(f)
    assert marker.exists()


def test_no_unsafe_loaders_in_the_package():
    """Every torch.load passes weights_only=True; no pickle / joblib / allow_pickle anywhere."""
    import re

    root = Path(__file__).resolve().parent.parent / "edgepeft"
    for f in root.rglob("*.py"):
        text = f.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (f, call)
        assert not re.search(r"^\s*(import pickle|from pickle|import joblib|import dill)", text, re.M), f
        assert "allow_pickle=True" not in text, f
        assert not re.search(r"pickle\.loads?\(", text), f


# ---------------------------------------------------------------- NaN / Inf at export
def _poison(ad: Path, pick, value: float) -> str:
    from safetensors.torch import load_file, save_file

    st = ad / "adapter_model.safetensors"
    tensors = load_file(st)
    key = next(k for k in sorted(tensors) if pick(k))
    tensors[key].view(-1)[0] = value
    save_file(tensors, st)
    return key


@pytest.fixture(scope="module")
def decoder_kinds(llama_base, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("nan-kinds")
    ads = {k: make_adapter(llama_base, root / k, k, **({"target_modules": ["q_proj"]} if k == "dora" else {}))
           for k in ("lora", "dora", "ia3", "prefix", "prompt", "p_tuning")}
    ads["bottleneck"] = make_bottleneck(llama_base, root / "bottleneck")
    return ads


# kind -> (which tensor to poison, what the message must name of it)
DECODER_CASES = {
    "lora": (lambda k: "lora_B" in k, lambda k: k.removeprefix("base_model.model.")),
    "dora": (lambda k: "lora_magnitude" in k, lambda k: k.removeprefix("base_model.model.").split(".lora_")[0]),
    "ia3": (lambda k: "ia3_l" in k, lambda k: k.removeprefix("base_model.model.").removesuffix(".ia3_l")),
    "prefix": (lambda k: True, lambda k: "prompt_embeddings"),
    "prompt": (lambda k: True, lambda k: "prompt_embeddings"),
    "p_tuning": (lambda k: True, lambda k: "prompt_embeddings"),
    "bottleneck": (lambda k: "adapter_up.bias" in k, lambda k: k),
}


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("kind", list(DECODER_CASES))
def test_nan_or_inf_weights_are_refused(llama_base, decoder_kinds, tmp_path, kind, value):
    pick, named = DECODER_CASES[kind]
    ad = _copy(decoder_kinds[kind], tmp_path / "ad")
    key = _poison(ad, pick, value)
    with pytest.raises(EdgepeftError, match=r"NaN or Inf|finite") as e:
        read_adapter("x", ad, load_causal_lm(llama_base))
    assert named(key) in str(e.value) and "adapter_model.safetensors" in str(e.value), str(e.value)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A tiny BERT without a head and adapters that carry one (modules_to_save)."""
    root = tmp_path_factory.mktemp("nan-bert")
    make_encoder("bert", root / "base")
    ads = {k: make_adapter(root / "base", root / k, k, task="SEQ_CLS") for k in ("lora", "ia3", "prompt")}
    ads["bottleneck"] = make_bottleneck(root / "base", root / "bottleneck", task="SEQ_CLS",
                                        heads=CLASSIFIER_HEADS["bert"], seed=7)
    return root / "base", ads


@pytest.mark.parametrize("kind", ["lora", "ia3", "prompt", "bottleneck"])
def test_nan_in_a_carried_head_is_refused(bert, tmp_path, kind):
    base, ads = bert
    ad = _copy(ads[kind], tmp_path / "ad")
    key = _poison(ad, lambda k: "classifier.weight" in k, float("nan"))
    model, _ = load_classifier(base, 2)
    with pytest.raises(EdgepeftError, match="NaN or Inf") as e:
        read_adapter("x", ad, model, "classification")
    assert "classifier.weight" in str(e.value) and "adapter_model.safetensors" in str(e.value)
    assert key
