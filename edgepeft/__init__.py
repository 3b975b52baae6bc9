"""edgepeft: PEFT adapters (LoRA, ...) exported to ONNX for on-device inference.

Stages, one package each: ``adapters`` (read PEFT dirs), ``export`` (torch -> ONNX artifact),
``quantize``, ``runtime`` (onnxruntime + numpy only), ``validate`` (artifact vs PyTorch).
"""

__version__ = "0.1.0"
