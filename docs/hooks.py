"""mkdocs hooks (mkdocs.yml `hooks:`): the site's home page is the README.

docs/index.md is a placeholder; its source is replaced by README.md with the
links rewritten for the site: `docs/x.md` becomes `x.md`, and a link to a file
outside docs/ (LICENSE, CHANGELOG.md, CITATION.cff) becomes its plain name.
"""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
LINK = re.compile(r"\[([^\]]+)\]\((?!https?:)([^)#]+)(#[^)]*)?\)")


def site_home(text):
    def relink(match):
        label, target, anchor = match.group(1), match.group(2), match.group(3) or ""
        if target.startswith("docs/"):
            return f"[{label}]({target[len('docs/'):]}{anchor})"
        return label if label == target else f"{label} ({target})"
    return LINK.sub(relink, text)


def on_page_read_source(page, config):
    if page.file.src_uri == "index.md":
        return site_home(README.read_text())
    return None
