"""The Ryzanstein engine: a Prefect-free runtime library in four wings, each importing only the ones before it:

    engine.model       a model file: checkpoint, quantizer, GGUF, numpy reference, native binding, kernel build
    engine.artifacts   store, registry, releases, references, gc, discovery, bundle packing
    engine.retrieval   embedder, corpus, index, search
    engine.serving     engine core, scheduler, sampling, text, structured output, the HTTP app, canary

`settings`, `errors` and `fsutil` sit at the root and every wing may use them. docs/architecture.md has the map.
"""
