"""The on-device runtime shim: onnxruntime + numpy (+ tokenizers for text), never torch.

    from edgepeft.runtime import Model
    m = Model("out/")
    m.logits(ids, adapter="chat")                 # (B, S, vocab)
    m.logits(ids, adapter={"chat": 0.7, "sql": 0.3})
    m.logits(ids, adapter={"sql": 1.0, "formal-prefix": 1.0})
    m.generate(ids, max_new_tokens=32, adapter="sql")
    Model("cls/").classify(["a warm film"], adapter="sentiment")   # (B, num_labels)
"""

from edgepeft.runtime.model import Model
from edgepeft.runtime.session import ProviderFallbackWarning

__all__ = ["Model", "ProviderFallbackWarning"]
