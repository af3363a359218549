"""The model wing: one model file from checkpoint to running forward.

Owns the checkpoint reader, the quantizer, the GGUF reader/writer, the numpy reference, the native binding, the
kernel build, its self-test and autotune, parity, the tokenizer over a GGUF, and synthetic shapes/checkpoints.
Imports only the engine root (settings, errors, fsutil): it is the first wing (docs/architecture.md).
"""
