"""Regenerate this folder's per-subject YAMLs and the group: python evaluations/tasks/mmlu_offline/_generate.py"""

from __future__ import annotations

import importlib.util
from pathlib import Path

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("mmlu_offline_utils", HERE / "utils.py")
if _spec is None or _spec.loader is None:
    raise ImportError(f"cannot load {HERE / 'utils.py'}")
utils = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(utils)


def main() -> None:
    for subject in utils.SUBJECTS:
        s = utils.slug(subject)
        (HERE / f"mmlu_offline_{s}.yaml").write_text(
            f"task: mmlu_offline_{s}\n"
            "include: _template_yaml\n"
            f'description: "The following are multiple choice questions (with answers) about {subject}.\\n\\n"\n'
            f"process_docs: !function utils.process_{s}\n"
        )
    names = "".join(f"  - mmlu_offline_{utils.slug(s)}\n" for s in utils.SUBJECTS)
    (HERE / "mmlu_offline.yaml").write_text(
        "group: mmlu_offline\n"
        f"task:\n{names}"
        "aggregate_metric_list:\n  - metric: acc\n    aggregation: mean\n    weight_by_size: true\n"
        "metadata:\n  version: 1.0\n"
    )


if __name__ == "__main__":
    main()
