"""A small published retrieval index in a scratch RYZ_HOME, for the serving and MCP tests: a few distinct
documents, indexed, packed, stored, registered as `index:1` and published (as `ryz index build` does)."""

from __future__ import annotations

import tempfile
from pathlib import Path

DOCS = {
    "docs/sourdough.md": "# Sourdough\n\nFeed the sourdough starter with flour and water every day; bake the bread "
    "when the starter doubles in size.\n",
    "docs/bicycle.md": "# Bicycle gears\n\nShift to a lower gear before climbing a hill; clean and oil the chain "
    "every few hundred kilometres.\n",
    "docs/volcano.md": "# Volcanoes\n\nMagma rises through the crust; an eruption throws out lava, ash and gas.\n",
    "src/widgets.py": 'def open_widget(path):\n    """Open a widget file and return its parts."""\n'
    "    with open(path) as f:\n        return f.read().split()\n",
    "notes.txt": "Meeting notes: the database migration is planned for Tuesday; backups run nightly at 2am.\n",
}


def link_embedder(export_dir: Path, home: Path) -> None:
    """Reuse the machine's ONNX export (keyed by weights hash and exporter version) in a scratch home."""
    target = home / "cache" / "embedder" / export_dir.name
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        target.symlink_to(export_dir, target_is_directory=True)


def publish_index(home: Path, export_dir: Path, docs: dict[str, str] = DOCS) -> str:
    """Build, store, register and publish an index of `docs` in the store under `home`; returns the artifact id."""
    from engine.artifacts.registry import Registry
    from engine.artifacts.store import open_store
    from engine.retrieval.corpus import scan_corpus
    from engine.retrieval.embedder import Embedder
    from engine.retrieval.index import (
        IndexConfig,
        manifest_fields,
        pack_index,
        read_state,
        update_index,
    )
    from engine.retrieval.index import (
        publish_index as publish,
    )

    link_embedder(export_dir, home)
    corpus = home.parent / "corpus"
    for rel, text in docs.items():
        (corpus / rel).parent.mkdir(parents=True, exist_ok=True)
        (corpus / rel).write_text(text)
    index_dir = home / "indexes" / "default"
    embedder = Embedder(export_dir, precision="int8", dims=384, batch_size=16, threads=2)
    update_index(
        index_dir, scan_corpus(corpus), embedder, IndexConfig(quantization="int8"), chunk_chars=400, overlap_chars=0
    )
    store = open_store(f"file://{home / 'store'}")
    with tempfile.TemporaryDirectory() as work:
        tarball = pack_index(index_dir, Path(work) / "index.tar.gz")
        artifact_id = store.put_file(tarball, "index", manifest_fields(read_state(index_dir), None))
    registry = Registry(store, actor="test")
    version = registry.register("index", artifact_id, {"kind": "corpus", "repo": str(corpus), "revision": "1"})
    publish(registry, version.ref, "test")
    return artifact_id
