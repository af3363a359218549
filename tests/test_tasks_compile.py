"""tasks/compile.py under a real (temporary) Prefect: the compile task caches on the build key, the
autotune task records its winner in the build manifest and reuses it for the next model of the same shape."""

from __future__ import annotations

import shutil

import pytest

pytest.importorskip("prefect", reason="Prefect is the `pipeline` extra: pip install -e '.[pipeline]'")

from engine.model.autotune import TuneShape, write_tuning_model  # noqa: E402
from engine.model.build import read_manifest  # noqa: E402
from engine.settings import reload_settings  # noqa: E402


def test_compile_and_autotune_tasks(prefect_harness, kernel_build, tmp_path):
    from prefect import flow

    from tasks.compile import autotune_kernels, compile_kernels, detect_cpu

    # A private RYZ_HOME holding a copy of the session's build: the key, not the place, names a build, so
    # this is a cache hit, and the autotune record lands in the copy, not in the user's cache.
    shutil.copytree(kernel_build.directory, tmp_path / "home" / "cache" / "kernels" / kernel_build.key)
    model = write_tuning_model(
        tmp_path / "small.gguf", TuneShape(hidden=256, heads=4, kv_heads=2, head_dim=64, ffn=512)
    )

    @flow(name="kernels-smoke")
    def kernels_smoke(model_path: str):
        return (
            detect_cpu(),
            compile_kernels(return_state=True),
            compile_kernels(return_state=True),
            autotune_kernels(model_path),
            autotune_kernels(model_path),
        )

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RYZ_HOME", str(tmp_path / "home"))
        reload_settings()
        try:
            fingerprint, first, second, tuned, again = kernels_smoke(str(model))
        finally:
            mp.undo()
            reload_settings()

    library = tmp_path / "home" / "cache" / "kernels" / kernel_build.key / "libryz.so"
    assert fingerprint["fingerprint_id"] == kernel_build.manifest["fingerprint"]["fingerprint_id"]
    assert first.is_completed() and first.result() == str(library)
    assert second.name == "Cached" and second.result() == str(library)  # Prefect's cache, keyed on the build
    assert tuned["build_key"] == kernel_build.key and tuned["signature"] == "h256-q4x64-kv2-ffn512"
    stored = read_manifest(library.parent)["autotune"][f"{tuned['signature']}/{tuned['isa']}"]
    assert stored["winner"] == tuned["winner"] and stored["table"]
    assert not tuned["reused"] and again["reused"]  # the pipeline's next candidate of this shape is not swept again
    assert again["winner"] == tuned["winner"] and again["seconds"] == stored["seconds"]
