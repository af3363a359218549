"""The retrieval wing: the compressed retrieval index.

Owns the ONNX MiniLM embedder, corpus chunking, the Qdrant index (embedded Edge or a server) and search.
Imports the engine root, `engine.model` and `engine.artifacts`, never `engine.serving` (docs/architecture.md).
"""
