"""Builders shared by the test files: tiny models, tokenizers and real adapters, made from configs.

Nothing here downloads. Adapters are made by peft itself with ``init_lora_weights=False`` (so
B != 0) and every trained tensor randomized, so a no-op export cannot pass a comparison. The
model and adapter builders seed torch themselves (``seed=``).

Plain functions only; the fixtures that use them live in ``conftest.py``.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 96
_ATTN = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128)

# model_type -> tiny config kwargs. Every family here exports and matches peft (tests prove it).
ARCHS = {
    "llama": _ATTN,
    "qwen2": _ATTN,
    "mistral": {**_ATTN, "sliding_window": None},
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=VOCAB),
    "qwen3": {**_ATTN, "head_dim": 16},
    "phi3": {**_ATTN, "pad_token_id": 0},
    "gemma": {**_ATTN, "head_dim": 16},
    "olmo": _ATTN,
    "olmo2": _ATTN,
    "stablelm": _ATTN,
    "granite": _ATTN,
    "cohere": _ATTN,
    "gpt_neox": {k: v for k, v in _ATTN.items() if k != "num_key_value_heads"},
    "phi": {k: v for k, v in _ATTN.items() if k != "num_key_value_heads"},
    "falcon": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
                   new_decoder_architecture=False),
}
_FATTN = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128)
_GEMMA = dict(_FATTN, head_dim=16, num_hidden_layers=3, sliding_window=4, query_pre_attn_scalar=24,
              layer_types=["sliding_attention", "full_attention", "sliding_attention"])

# model_type -> tiny config with every feature its fused-graph description covers (tests/test_families.py)
FAMILIES = {
    "llama": dict(_FATTN, rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 16}),
    "qwen2": _FATTN,  # q/k/v biases
    "mistral": dict(_FATTN, sliding_window=4),
    "qwen3": dict(_FATTN, head_dim=16),  # q/k norm
    "smollm3": dict(_FATTN, num_hidden_layers=4, no_rope_layer_interval=2, pad_token_id=0),  # NoPE layers 1, 3
    "phi3": dict(_FATTN, hidden_size=128, pad_token_id=0, partial_rotary_factor=0.5),  # packed, rotary 16 of 32
    "gemma3_text": dict(_GEMMA, rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                                 "full_attention": {"rope_type": "default", "rope_theta": 1e6}}),
    "gemma3": dict(text_config=dict(_GEMMA, vocab_size=VOCAB + 4), mm_tokens_per_image=4,  # text tower
                   vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, image_size=28, patch_size=14),
                   boi_token_index=VOCAB, eoi_token_index=VOCAB + 1, image_token_index=VOCAB + 2),
    "gemma2": dict(_GEMMA, attn_logit_softcapping=3.0, final_logit_softcapping=2.0,
                   attn_implementation="eager"),
}




def make_family_base(arch: str, path: Path) -> Path:
    """A tiny causal LM of ``FAMILIES[arch]`` with every 1-D weight (norms, biases) randomized."""
    from transformers import AutoConfig, AutoModelForCausalLM

    _quiet()
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(arch, **FAMILIES[arch])
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norms (and biases): away from their init, so each one counts
                p.copy_(torch.randn_like(p) * 0.3 + (0.0 if "gemma" in arch else 1.0) * ("norm" in name))
    model.save_pretrained(path)
    return path


# Families whose merged export is tested too (the rest: side branch, which covers the same export).
MERGED_ARCHS = ("llama", "qwen2", "mistral", "gpt2")


def _quiet():
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def make_base(arch: str, path: Path, tokenizer: bool = False, seed: int = 0, **overrides) -> Path:
    """Save a tiny randomly initialised causal LM of family ``arch`` to ``path``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    _quiet()
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(arch, **{**ARCHS[arch], **overrides})
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    if tokenizer:
        make_tokenizer(path)
    return path


def make_tokenizer(path: Path) -> None:
    """A word-level tokenizer over VOCAB tokens (``<eos>`` = 2), saved as a fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<eos>")
    fast.save_pretrained(path)


def linear_leaves(base: Path) -> list[str]:
    """Leaf names of the adaptable layers (Linear / Conv1D, not the LM head), in model order."""
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    model = AutoModelForCausalLM.from_pretrained(base)
    head = model.get_output_embeddings()
    leaves = []
    for n, m in model.named_modules():
        if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not head:
            leaf = n.rsplit(".", 1)[-1]
            if leaf not in leaves:
                leaves.append(leaf)
    return leaves


def make_lora(base: Path, out: Path, seed: int = 1, **lora_kwargs) -> Path:
    """Save a PEFT LoRA adapter with random non-zero A and B for the base at ``base``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    _quiet()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    kwargs = dict(r=4, lora_alpha=8, init_lora_weights=False, task_type="CAUSAL_LM")
    kwargs.update(lora_kwargs)
    peft_model = get_peft_model(model, LoraConfig(**kwargs))
    with torch.no_grad():  # peft's non-default init is small; make the deltas clearly visible
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.mul_(4.0)
    peft_model.save_pretrained(out)
    return out


def make_adapter(base: Path, out: Path, kind: str, seed: int = 1, task: str = "CAUSAL_LM",
                 **kwargs) -> Path:
    """Save a PEFT adapter of ``kind`` (lora, dora, ia3, prefix, prompt, p_tuning, vera) with every
    trained tensor randomized (IA3 and VeRA's lambda_b away from 1, DoRA magnitudes away from the
    row norms, heads re-drawn), so no kind can pass a comparison as a no-op."""
    from peft import (IA3Config, LoraConfig, PrefixTuningConfig, PromptEncoderConfig,
                      PromptTuningConfig, VeraConfig, get_peft_model)
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    _quiet()
    torch.manual_seed(seed)
    cls = AutoModelForCausalLM if task == "CAUSAL_LM" else AutoModelForSequenceClassification
    model = cls.from_pretrained(base)
    make = {
        "lora": lambda: LoraConfig(**{"r": 4, "lora_alpha": 8, "init_lora_weights": False, **kwargs}),
        "dora": lambda: LoraConfig(**{"r": 4, "lora_alpha": 8, "init_lora_weights": False,
                                      "use_dora": True, **kwargs}),
        "ia3": lambda: IA3Config(**kwargs),
        "prefix": lambda: PrefixTuningConfig(**{"num_virtual_tokens": 5, **kwargs}),
        "prompt": lambda: PromptTuningConfig(**{"num_virtual_tokens": 4, **kwargs}),
        "p_tuning": lambda: PromptEncoderConfig(**{"num_virtual_tokens": 4, "encoder_hidden_size": 32,
                                                   **kwargs}),
        # init_weights=False: lambda_d ~ N(0, 1) (PEFT's default init sets lambda_b = 0, a no-op)
        "vera": lambda: VeraConfig(**{"r": 8, "init_weights": False, **kwargs}),
    }
    config = make[kind]()
    config.task_type = task
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if not p.requires_grad:
                continue
            if "lora_B" in n:
                p.mul_(4.0)
            elif "ia3_l" in n or "magnitude" in n or "vera_lambda_b" in n:
                p.mul_(1 + 0.5 * torch.randn_like(p))
            elif "modules_to_save" in n or "embedding" in n:
                p.copy_(torch.randn_like(p) * 0.5)
    peft_model.save_pretrained(out)
    return out


# ---------------------------------------------------------------- bottleneck adapters
def make_bottleneck(base: Path, out: Path, *, task: str = "CAUSAL_LM", heads: list[str] | None = None,
                    seed: int = 5, config: str = "houlsby", act: str = "gelu") -> Path:
    """Save an edgepeft bottleneck adapter (reduction factor 8, up-projections drawn with std 1)
    for the tiny model at ``base`` to ``out``.

    ``task`` is ``CAUSAL_LM`` or ``SEQ_CLS``; a ``SEQ_CLS`` adapter carries the head modules
    ``heads`` (e.g. ``["classifier"]``), re-drawn so the base's untrained head cannot pass a test.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from edgepeft.kinds.bottleneck import BottleneckConfig, add_bottleneck, save_bottleneck

    if (task == "SEQ_CLS") != bool(heads):
        raise ValueError(f"make_bottleneck: task={task!r} with heads={heads!r}; a SEQ_CLS adapter "
                         "carries its head modules, a CAUSAL_LM one none")
    _quiet()
    torch.manual_seed(seed)
    if task == "CAUSAL_LM":
        model = AutoModelForCausalLM.from_pretrained(base)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if any(name.startswith(h + ".") for h in heads):
                    p.copy_(torch.randn_like(p) * 0.5)
    cfg = BottleneckConfig(config=config, reduction_factor=8, non_linearity=act)
    add_bottleneck(model, cfg, init_up_std=1.0)
    return save_bottleneck(model, out, cfg, task, str(base), modules_to_save=heads)


# ---------------------------------------------------------------- encoders
ENCODER_ARCHS = ("bert", "roberta", "distilbert")
# the head modules a SEQ_CLS adapter carries per encoder family (peft's modules_to_save)
CLASSIFIER_HEADS = {"bert": ["classifier"], "roberta": ["classifier"],
                    "distilbert": ["pre_classifier", "classifier"]}


def encoder_config(arch: str, hidden: int = 64, layers: int = 2, heads: int = 4) -> dict:
    """Tiny config kwargs for encoder family ``arch`` (feed-forward width ``2 * hidden``, VOCAB
    tokens, 64 positions; RoBERTa gets 66 = 64 + its padding offset, and pad id 0)."""
    if arch in ("bert", "roberta"):
        kw = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=2 * hidden, vocab_size=VOCAB, max_position_embeddings=64)
        return {**kw, "max_position_embeddings": 66, "pad_token_id": 0} if arch == "roberta" else kw
    if arch == "distilbert":
        return dict(dim=hidden, n_layers=layers, n_heads=heads, hidden_dim=2 * hidden, vocab_size=VOCAB,
                    max_position_embeddings=64)
    raise ValueError(f"encoder_config: no tiny config for {arch!r}; one of {', '.join(ENCODER_ARCHS)}")


def make_encoder(arch: str, path: Path, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                 seed: int | None = 0, tokenizer: bool = True) -> Path:
    """Save a tiny randomly initialised encoder of family ``arch`` without a head (like a sentence
    encoder) to ``path``, with the word-level tokenizer unless ``tokenizer=False``.

    ``seed=None`` draws from torch's current random state instead of re-seeding.
    """
    from transformers import AutoConfig, AutoModel

    _quiet()
    if seed is not None:
        torch.manual_seed(seed)
    cfg = AutoConfig.for_model(arch, **encoder_config(arch, hidden, layers, heads))
    AutoModel.from_config(cfg).save_pretrained(path)
    if tokenizer:
        make_tokenizer(path)
    return path


def write_labelled(path: Path, rows: int = 40, seed: int = 0) -> Path:
    """A jsonl of ``rows`` random ``{"text", "label"}`` rows over the tiny word-level vocabulary
    (3-19 words, labels 0/1), for ``validate --labels`` on the tiny classifiers."""
    import json

    import numpy as np

    rng = np.random.default_rng(seed)
    lines = [{"text": " ".join(f"w{i}" for i in rng.integers(3, VOCAB, rng.integers(3, 20))),
              "label": int(rng.integers(0, 2))} for _ in range(rows)]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path
