"""Session fixtures shared by the test files: a tiny Llama, its LoRA adapters and their artifact.

The builders they call (and the test files call) are plain functions in ``helpers.py``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from helpers import make_base, make_lora

warnings.filterwarnings("ignore")


@pytest.fixture(scope="session")
def llama_base(tmp_path_factory) -> Path:
    """A tiny Llama with a word-level tokenizer."""
    return make_base("llama", tmp_path_factory.mktemp("llama") / "base", tokenizer=True)


@pytest.fixture(scope="session")
def llama_adapters(llama_base, tmp_path_factory) -> dict[str, Path]:
    """Three LoRA adapters over ``llama_base``: different ranks, target styles and scales."""
    root = tmp_path_factory.mktemp("llama-adapters")
    return {
        "chat": make_lora(llama_base, root / "chat", r=4, lora_alpha=8,
                          target_modules=["q_proj", "v_proj"]),
        "sql": make_lora(llama_base, root / "sql", seed=2, r=8, lora_alpha=16, use_rslora=True,
                         target_modules="all-linear", rank_pattern={"o_proj": 2},
                         alpha_pattern={"down_proj": 4}),
        "code": make_lora(llama_base, root / "code", seed=3, r=2, lora_alpha=3,
                          target_modules=["k_proj", "up_proj"], layers_to_transform=[1]),
    }


@pytest.fixture(scope="session")
def llama_side(llama_base, llama_adapters, tmp_path_factory) -> Path:
    """Side-branch artifact of the tiny Llama with both adapters (exported once per run)."""
    from edgepeft.export import ExportConfig, export

    out = tmp_path_factory.mktemp("llama-side") / "out"
    export(ExportConfig(graph="generic", base=llama_base, out=out, adapters=tuple(llama_adapters.items())), quiet=True)
    return out
