"""The demo language: a deterministic procedural corpus, its BPE tokenizer, the demo_* task data, and an
engine-side quick scorer for the demo model zoo (examples/zoo)."""
