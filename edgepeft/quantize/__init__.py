"""Quantization stage (fp16, int8 dynamic/static, int4 weight-only with adapter branches kept in
float) comes with the quantization issue. Today every artifact is fp32 and this stage is a no-op;
``PRECISIONS`` lists what ``export`` can write."""

PRECISIONS = ("fp32",)
