"""How close onnxruntime-genai's int4 SmolLM2 (LoRA baked in) is to the fp32 model, beside edgepeft's.

``bench_speed.py`` times onnxruntime-genai's builder output (``-p int4 -e cpu --extra_options
adapter_path=numbers``) but cannot validate it (no edgepeft manifest). This script scores its logits
the way ``edgepeft validate`` scores an artifact's: every position of the validate texts
(``edgepeft/calibration/heldout.txt``, first 64 tokens each), mean KL(fp32 || system) and top-1 agreement,
against edgepeft's fused fp32 side artifact with ``numbers`` active (itself within 2e-11 KL of PyTorch
+ peft: ``bench_speed``'s validate column). edgepeft's int4 artifacts are scored the same way beside it.

Run after ``bench_speed.py`` (it reads ``benchmarks/results/speed/{genai-int4,fused-*}``)::

    python benchmarks/genai_quality.py      # -> benchmarks/results/genai_quality.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SPEED = ROOT / "benchmarks" / "results" / "speed"
ADAPTER = "numbers"


def _genai_logits(sess, ids: list[int], head_size: int) -> np.ndarray:
    """(S, V) logits of one unpadded row, empty past (the builder's graph takes a mask, no positions)."""
    feeds = {"input_ids": np.asarray([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            feeds[i.name] = np.zeros((1, i.shape[1], 0, head_size), np.float32)
    return sess.run(["logits"], feeds)[0][0]


def main() -> int:
    import onnxruntime as ort

    from edgepeft.data import load_texts
    from edgepeft.runtime import Model
    from edgepeft.validate import DEFAULT_TEXTS, TEXT_TOKENS
    from edgepeft.validate.metrics import kl_rows as _kl

    ref = Model(SPEED / "fused-fp32-side")
    rows = [ref.tokenizer.encode(t).ids[:TEXT_TOKENS] for t in load_texts(DEFAULT_TEXTS)]
    ref_logits = [ref.logits(np.asarray([r]), adapter=ADAPTER)[0] for r in rows]
    systems = {}
    so = ort.SessionOptions()
    so.log_severity_level = 3
    genai = ort.InferenceSession(str(SPEED / "genai-int4" / "model.onnx"), so, providers=["CPUExecutionProvider"])
    head_size = json.loads((SPEED / "genai-int4" / "genai_config.json").read_text())["model"]["decoder"]["head_size"]
    systems["onnxruntime-genai int4 (LoRA baked)"] = [_genai_logits(genai, r, head_size) for r in rows]
    for name in ("fused-int4-side", "fused-int4-merged"):
        if (SPEED / name / "manifest.json").is_file():
            m = Model(SPEED / name)
            adapter = ADAPTER if ADAPTER in m.manifest["adapters"] else None
            systems[f"edgepeft {name}"] = [m.logits(np.asarray([r]), adapter=adapter)[0] for r in rows]
    out = {"texts": len(rows), "positions": int(sum(len(r) for r in rows)), "reference": "edgepeft fused-fp32-side + numbers"}
    for name, logits in systems.items():
        kl = np.concatenate([_kl(p, q) for p, q in zip(ref_logits, logits)])
        top1 = np.concatenate([p.argmax(-1) == q.argmax(-1) for p, q in zip(ref_logits, logits)])
        out[name] = {"mean_kl": float(kl.mean()), "top1": float(top1.mean())}
        print(f"{name:45s} mean KL {kl.mean():.4f}  top-1 {100 * top1.mean():.2f} %")
    (ROOT / "benchmarks" / "results" / "genai_quality.json").write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
