"""The config reference: every key, its default and its meaning, as a markdown table.

Generated from the schema: each key's help is declared with the key itself
(``nrd_dist.config.setting``). ``python -m nrd_dist.config_reference`` prints the table;
the README embeds it between markers and a test checks that they agree, so the docs
cannot drift.
"""

from __future__ import annotations

import dataclasses

from nrd_dist.config import Config, field_help, schema_fields


def leaf_keys(cls: type = Config) -> list[tuple[str, object]]:
    """(dotted key, default) of every leaf of the schema, in declaration order."""
    return [(key, _default(f)) for key, f, hint in schema_fields(cls) if not dataclasses.is_dataclass(hint)]


def _default(f: dataclasses.Field) -> object:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


# Every leaf key's help text (some quote a component's table, e.g. the loss names, so
# reading them imports torch: this module is for docs, not for training).
HELP = {key: field_help(f) for key, f, hint in schema_fields() if not dataclasses.is_dataclass(hint)}


def _show(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if value in ({}, [], ""):
        return {dict: "{}", list: "[]", str: '""'}[type(value)]
    return str(value)


def render_markdown() -> str:
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key, default in leaf_keys():
        lines.append(f"| `{key}` | `{_show(default)}` | {HELP[key]} |")
    return "\n".join(lines) + "\n"


START, END = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"


def update_readme(path: str) -> None:
    """Rewrite the table between the README's markers."""
    from pathlib import Path

    text = Path(path).read_text()
    head, rest = text.split(START, 1)
    Path(path).write_text(head + START + render_markdown() + END + rest.split(END, 1)[1])


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--update"]:  # python -m nrd_dist.config_reference --update README.md
        update_readme(sys.argv[2])
    else:
        print(render_markdown(), end="")
