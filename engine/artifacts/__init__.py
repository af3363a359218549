"""The artifacts wing: where models and their records live and what they are called.

Owns the content-addressed store (file and S3), the registry (versions, aliases, events), release documents,
model references (a reference becomes a path here), garbage collection, discovery of candidates, and serving
bundle packing. Imports the engine root and `engine.model`, never a later wing (docs/architecture.md).
"""
