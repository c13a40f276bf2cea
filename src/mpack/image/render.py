"""Render the build-image templates strictly and safely.

A sandboxed Jinja2 environment (templates cannot reach Python internals), ``StrictUndefined`` (a misspelt variable
is an error, not an empty string) and three quoting filters, so no value can add a line to a Dockerfile:

* ``sh``: ``shlex.quote`` for values on ``RUN`` shell lines;
* ``dq``: a Dockerfile double-quoted string for ``LABEL``/``ENV`` values (escapes ``\\``, ``"`` and ``$``, which
  Dockerfile instructions would otherwise expand as variables);
* ``json``: a JSON literal (also a valid Python string/number literal) for the server config and the entry point.

Control characters never reach a filter: config validation rejects them, and ``dq`` refuses them again.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from mpack.errors import ConfigError

# Rendered file name → template name; the Dockerfile's template comes from the variant (compat.json).
SUPPORT_TEMPLATES = (("entrypoint.py", "entrypoint.py.j2"), ("deploy.json", "deploy.json.j2"))


def dockerfile_string(value: object) -> str:
    """A Dockerfile double-quoted string: ``a "b" $c`` → ``"a \\"b\\" \\$c"``."""
    text = str(value)
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise ConfigError("Dockerfile value", text, "contains a control character")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$") + '"'


def json_literal(value: object, indent: int | None = None) -> str:
    """JSON with sorted keys, ASCII only: one line (exec-form arrays) or indented (files)."""
    return json.dumps(value, indent=indent, sort_keys=True, ensure_ascii=True)


def environment(template_dirs: tuple[Path, ...]):
    """The strict, sandboxed Jinja2 environment over ``template_dirs`` (first match wins, so a user's folder can
    override a built-in template and ``{% extends %}`` it)."""
    from jinja2 import FileSystemLoader, StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment

    env = SandboxedEnvironment(
        loader=FileSystemLoader([str(d) for d in template_dirs]),
        undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
        autoescape=False)
    env.filters.update(sh=lambda v: shlex.quote(str(v)), dq=dockerfile_string, json=json_literal)
    return env


def render(ctx, template_dirs: tuple[Path, ...], dockerfile_template: str) -> dict[str, str]:
    """Render every template of the image for ``ctx``: ``{"Dockerfile": ..., "entrypoint.py": ..., ...}``.

    Args:
        ctx: The ImageContext (the only thing templates see, as ``ctx``).
        template_dirs: Folders to load templates from, in order.
        dockerfile_template: The variant's Dockerfile template name (compat.json).

    Returns:
        File name in the build context → rendered text.
    """
    from jinja2 import TemplateError

    env = environment(template_dirs)
    files = {"Dockerfile": dockerfile_template, **dict(SUPPORT_TEMPLATES)}
    rendered = {}
    for name, template in files.items():
        try:
            rendered[name] = env.get_template(template).render(ctx=ctx)
        except TemplateError as exc:
            raise ConfigError("template", template, f"does not render: {exc}",
                              hint="a template may only use ctx fields and the sh/dq/json filters") from None
    return rendered
