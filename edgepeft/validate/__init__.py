"""``edgepeft validate``: does the artifact still agree with the PyTorch (peft) model?

Per case (no adapter, each adapter, a weighted mix) both sides run the same left-padded batch;
real-token positions are compared: max |Δlogits|, mean KL(torch || artifact), top-1 agreement,
and greedy generations (the torch side recomputes the whole sequence each step, no cache, so the
artifact's KV cache is checked too). Every case is checked and all failures are reported together.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from edgepeft.errors import EdgepeftError
from edgepeft.runtime.model import Model, batch_inputs, positions

# Default prompts when the caller gives none and the artifact has a tokenizer.
DEFAULT_PROMPTS = (
    "The capital of France is",
    "Review: a warm, funny and surprisingly moving film.\nSentiment:",
    "Number: 4821\nIn words:",
    "def fibonacci(n):",
)


@dataclass(frozen=True)
class Budget:
    """Accuracy budget of a precision; a case passes when every bound holds.

    Attributes:
        max_abs_logits: largest allowed |Δlogits| at any real-token position.
        min_top1: smallest allowed share of positions whose argmax agrees.
        max_kl: largest allowed mean KL(torch || artifact) per position.
        greedy_must_match: greedy generations must be token-identical.
    """

    max_abs_logits: float = 1e-3
    min_top1: float = 1.0
    max_kl: float = 1e-5
    greedy_must_match: bool = True

    def __post_init__(self):
        if not (self.max_abs_logits > 0 and 0 <= self.min_top1 <= 1 and self.max_kl >= 0):
            raise EdgepeftError(f"budget {self}: bounds must be positive and top-1 within [0, 1].")


BUDGETS = {"fp32": Budget()}


@dataclass(frozen=True)
class CaseResult:
    """Agreement of one adapter choice over all prompts."""

    case: str
    positions: int
    max_abs_logits: float
    mean_kl: float
    top1_agreement: float
    greedy_tokens: int
    greedy_mismatches: int
    failures: tuple[str, ...]


def _case_name(choice) -> str:
    if choice is None:
        return "base"
    if isinstance(choice, str):
        return choice
    return "mix(" + ",".join(f"{k}={v:g}" for k, v in choice.items()) + ")"


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(p || q) per row of logits ``(N, V)`` -> ``(N,)``, in float64."""
    p = p_logits.astype(np.float64)
    q = q_logits.astype(np.float64)
    lp = p - p.max(-1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
    lq = q - q.max(-1, keepdims=True)
    lq -= np.log(np.exp(lq).sum(-1, keepdims=True))
    return (np.exp(lp) * (lp - lq)).sum(-1)


@torch.no_grad()
def _torch_logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                position_ids=torch.from_numpy(positions(mask)), use_cache=False)
    return out.logits.float().numpy()  # (B, S, V)


def _torch_greedy(model, ids: np.ndarray, mask: np.ndarray, n: int) -> np.ndarray:
    """Greedy decoding by full recomputation (no cache): the plain definition. -> (B, n)."""
    new = []
    for _ in range(n):
        nxt = _torch_logits(model, ids, mask)[:, -1].argmax(-1)[:, None].astype(np.int64)  # (B, 1)
        new.append(nxt)
        ids = np.concatenate([ids, nxt], 1)
        mask = np.concatenate([mask, np.ones_like(nxt)], 1)
    return np.concatenate(new, 1)


class _Reference:
    """The server side: the base model with every adapter loaded through peft."""

    def __init__(self, reference: Path, manifest: dict, adapter_dirs: dict[str, Path]):
        from peft import PeftModel

        from edgepeft.export.base import fingerprint, load_causal_lm

        base = load_causal_lm(reference)
        fp = fingerprint(base)
        if fp != manifest["base"]["fingerprint"]:
            raise EdgepeftError(f"{reference}: its weights (fingerprint {fp[:19]}...) are not the base "
                                f"this artifact was exported from ({manifest['base']['fingerprint'][:19]}"
                                "...). Pass the same --reference folder that export used.")
        self.model = base
        for i, (name, path) in enumerate(adapter_dirs.items()):
            if i == 0:
                self.model = PeftModel.from_pretrained(base, path, adapter_name=name)
            else:
                self.model.load_adapter(path, adapter_name=name)
        self.model.eval()

    def run(self, choice, fn):
        """Call ``fn(model)`` with ``choice`` active: None, a name, or a mix merged as Σ w_i ΔW_i."""
        if choice is None:
            if hasattr(self.model, "disable_adapter"):
                with self.model.disable_adapter():
                    return fn(self.model)
            return fn(self.model)
        if isinstance(choice, str):
            self.model.set_adapter(choice)
            return fn(self.model)
        from peft.tuners.lora import LoraLayer

        applied = []
        with torch.no_grad():
            for module in self.model.modules():
                if isinstance(module, LoraLayer):
                    deltas = [w * module.get_delta_weight(n) for n, w in choice.items() if n in module.lora_A]
                    if deltas:
                        delta = sum(deltas)
                        module.get_base_layer().weight += delta
                        applied.append((module, delta))
        try:
            with self.model.disable_adapter():
                return fn(self.model)
        finally:
            with torch.no_grad():
                for module, delta in applied:
                    module.get_base_layer().weight -= delta


def default_choices(artifact: Model) -> list:
    """Base, each adapter, and (with 2+ adapters) one mix; merged artifacts: each adapter."""
    names = artifact.adapters
    if artifact.merged:
        return list(names)
    choices: list = [None, *names]
    if len(names) >= 2:
        weights = [0.7, 0.3] if len(names) == 2 else [1.0 / len(names)] * len(names)
        choices.append(dict(zip(names, weights)))
    return choices


def validate(artifact_dir: Path, reference: Path, prompts: list[str] | None = None,
             max_new_tokens: int = 32, budget: Budget | None = None,
             adapter_dirs: dict[str, Path] | None = None, report: Path | None = None) -> dict:
    """Compare an artifact with its PyTorch reference; see the module docstring.

    Args:
        artifact_dir: output of ``edgepeft export``.
        reference: the base model folder the artifact was exported from.
        prompts: texts (needs the artifact's tokenizer); default: built-in prompts, or seeded random
            token ids when the artifact has no tokenizer.
        max_new_tokens: greedy tokens compared per prompt.
        budget: bounds; default the artifact precision's.
        adapter_dirs: PEFT dirs per adapter; default the sources recorded at export.
        report: where to write ``report.json``; default ``artifact_dir/report.json``.

    Returns:
        The report dict; ``report["passed"]`` is False when any case breaks the budget.
    """
    t0 = time.perf_counter()
    art = Model(artifact_dir)
    manifest = art.manifest
    budget = budget or BUDGETS[manifest["precision"]]
    dirs = {n: Path(e["source"]) for n, e in manifest["adapters"].items()}
    dirs.update(adapter_dirs or {})
    for n, d in dirs.items():
        if not (d / "adapter_config.json").is_file():
            raise EdgepeftError(f"{d}: adapter {n!r}'s PEFT folder is not there (needed as the "
                                f"reference). Pass --adapter {n}=DIR.")
    if manifest.get("tokenizer"):
        rows = [art.tokenizer.encode(p).ids for p in (prompts or DEFAULT_PROMPTS)]
    elif prompts:
        raise EdgepeftError(f"{artifact_dir}: the artifact has no tokenizer, so text prompts cannot "
                            "be encoded. Leave out --prompts to use random token ids.")
    else:
        rng = np.random.default_rng(0)
        rows = [rng.integers(0, manifest["base"]["vocab_size"], n).tolist() for n in (5, 9, 12, 7)]
    ids, mask = batch_inputs(rows, vocab=manifest["base"]["vocab_size"])
    real = mask.astype(bool)

    ref = _Reference(reference, manifest, dirs)
    results = []
    for choice in default_choices(art):
        ort_logits = art.logits(ids, adapter=choice, attention_mask=mask)
        pt_logits = ref.run(choice, lambda m: _torch_logits(m, ids, mask))
        diff = float(np.abs(ort_logits - pt_logits)[real].max())
        kl = float(_kl(pt_logits[real], ort_logits[real]).mean())
        top1 = float((ort_logits.argmax(-1) == pt_logits.argmax(-1))[real].mean())
        gen = art.generate(ids, max_new_tokens, adapter=choice, attention_mask=mask,
                           stop_at_eos=False)[:, ids.shape[1]:]
        pt_gen = ref.run(choice, lambda m: _torch_greedy(m, ids, mask, max_new_tokens))
        mism = int((gen != pt_gen).sum())
        failures = []
        if not diff <= budget.max_abs_logits:  # also catches NaN
            failures.append(f"max |Δlogits| {diff:.3g} > {budget.max_abs_logits:g}")
        if not top1 >= budget.min_top1:
            failures.append(f"top-1 agreement {top1:.2%} < {budget.min_top1:.2%}")
        if not kl <= budget.max_kl:
            failures.append(f"mean KL {kl:.3g} > {budget.max_kl:g}")
        if budget.greedy_must_match and mism:
            failures.append(f"greedy generation differs at {mism}/{gen.size} tokens")
        results.append(CaseResult(_case_name(choice), int(real.sum()), diff, kl, top1, int(gen.size),
                                  mism, tuple(failures)))
    out = {"artifact": str(artifact_dir), "reference": str(reference),
           "precision": manifest["precision"], "mode": manifest["mode"], "budget": asdict(budget),
           "prompts": len(rows), "max_new_tokens": max_new_tokens,
           "cases": [asdict(r) for r in results],
           "passed": all(not r.failures for r in results),
           "seconds": round(time.perf_counter() - t0, 2)}
    report = report or artifact_dir / "report.json"
    report.write_text(json.dumps(out, indent=2) + "\n")
    return out


def format_report(result: dict) -> str:
    """A plain-text table of a :func:`validate` result, one row per case, failures spelled out."""
    lines = [f"{'case':<36} {'max|Δlogits|':>12} {'mean KL':>10} {'top-1':>7} {'greedy':>9}  verdict"]
    for c in result["cases"]:
        greedy = f"{c['greedy_tokens'] - c['greedy_mismatches']}/{c['greedy_tokens']}"
        verdict = "ok" if not c["failures"] else "FAIL: " + "; ".join(c["failures"])
        lines.append(f"{c['case'][:36]:<36} {c['max_abs_logits']:>12.2e} {c['mean_kl']:>10.2e} "
                     f"{c['top1_agreement']:>7.2%} {greedy:>9}  {verdict}")
    b = result["budget"]
    lines.append(f"budget ({result['precision']}): max|Δlogits| <= {b['max_abs_logits']:g}, "
                 f"top-1 >= {b['min_top1']:.0%}, KL <= {b['max_kl']:g}, greedy identical: "
                 f"{b['greedy_must_match']}  ->  {'PASSED' if result['passed'] else 'FAILED'}")
    return "\n".join(lines)
