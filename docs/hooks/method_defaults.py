"""mkdocs hook: `<!-- method defaults -->` on a page becomes the table of every registered method's
hyperparameters and defaults, read from the registry (so the docs cannot drift from the code)."""

from __future__ import annotations

import re

MARKER = re.compile(r"^<!-- method defaults -->$", re.MULTILINE)


def method_defaults_table() -> str:
    """The markdown table: method, hyperparameters with their defaults, stop fraction, needs `total_steps`."""
    import dst_prune
    from dst_prune.algorithms.registry import method_class

    rows = ["| `method=` | hyperparameters (defaults) | stops at | needs `total_steps` |", "|---|---|---|---|"]
    for name in dst_prune.list_methods():
        cls = method_class(name)
        defaults = ", ".join(f"`{k}={v!r}`".replace("|", "\\|") for k, v in cls.defaults().items()) or "none"
        stop = "never" if cls.default_stop_fraction is None else f"{cls.default_stop_fraction:g} of `total_steps`"
        needs = cls.needs_total_steps if isinstance(cls.needs_total_steps, bool) else cls().needs_total_steps
        rows.append(f"| `{name}` | {defaults} | {stop} | {'yes' if needs else 'no'} |")
    return "\n".join(rows)


def on_page_markdown(markdown: str, **kwargs: object) -> str:
    if not MARKER.search(markdown):
        return markdown
    return MARKER.sub(lambda _: method_defaults_table(), markdown)
