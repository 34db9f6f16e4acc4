"""mkdocs hook: on the API page, objects of the repo's `integrations/` folder carry their import path.

The folder is installed as `dst_prune.integrations` (pyproject.toml's package-dir), but mkdocstrings reads the source
tree, where it is `integrations`: anchors, links and headings are renamed to `dst_prune.integrations.*` so that
what the page shows is what users import.
"""

from __future__ import annotations

import re

_PATH = re.compile(r'(?<![\w.])integrations\.(?=[A-Za-z_])')


def on_page_content(html: str, page: object, **kwargs: object) -> str:
    if getattr(getattr(page, "file", None), "src_uri", "") != "api.md":
        return html
    return _PATH.sub("dst_prune.integrations.", html)
