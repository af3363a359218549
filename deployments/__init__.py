"""Deployment templates (jinja2) and the one function that renders them.

Templates are plain files beside this module, shipped as package data; variables are strict (a
missing one is an error, not an empty string) and rendering is sandboxed.
"""

from __future__ import annotations

from pathlib import Path

from jinja2 import FileSystemLoader, StrictUndefined
from jinja2.sandbox import ImmutableSandboxedEnvironment

TEMPLATES = Path(__file__).parent
_env = ImmutableSandboxedEnvironment(
    loader=FileSystemLoader(TEMPLATES),
    undefined=StrictUndefined,
    keep_trailing_newline=True,
    trim_blocks=True,
    lstrip_blocks=True,
)
_env.filters["yaml_str"] = lambda v: '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def render(template: str, **context) -> str:
    """Render `deployments/<template>` with `context`."""
    return _env.get_template(template).render(**context)


def render_continue_config(base_url: str, models: list[str], api_key: str | None = None) -> str:
    """A Continue.dev `config.yaml` with one entry per served model name, all on our server."""
    return render("continue.yaml.j2", base_url=base_url.rstrip("/") + "/v1", models=models, api_key=api_key)
