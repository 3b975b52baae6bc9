"""The on-device runtime shim: onnxruntime + numpy (+ tokenizers for text), never torch.

    from edgepeft.runtime import Model
    m = Model("out/")
    m.logits(ids, adapter="chat")                 # (B, S, vocab)
    m.logits(ids, adapter={"chat": 0.7, "sql": 0.3})
    m.generate(ids, max_new_tokens=32, adapter="sql")
"""

from edgepeft.runtime.model import Model

__all__ = ["Model"]
