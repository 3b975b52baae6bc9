"""Quantization stage (fp16, int8 dynamic/static, int4 weight-only with adapter branches kept in
float) comes with the quantization issue. Every artifact is fp32 today; nothing here runs yet."""
