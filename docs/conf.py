"""Sphinx configuration for the scrapy-resilience documentation."""

import re
from pathlib import Path

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
PACKAGE_INIT = REPOSITORY_ROOT / "scrapy_resilience" / "__init__.py"


def read_version(init_file: Path) -> str:
    """Read the ``__version__`` string assigned in ``init_file``.

    The file is read as text, not imported, so the docs build even when the package or
    its dependencies cannot be imported. Returns ``"unknown"`` while the file does not
    exist, and raises ``RuntimeError`` when it exists without a ``__version__`` line.
    """
    try:
        source = init_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        return "unknown"

    match = re.search(
        r"""^__version__(?:\s*:\s*\w+)?\s*=\s*["']([^"']+)["']""",
        source,
        re.MULTILINE,
    )
    if match is None:
        raise RuntimeError(
            f"__version__ not found in {init_file}: "
            'the docs read it from a line like __version__ = "0.1.0"'
        )
    return match.group(1)


project = "scrapy-resilience"
author = "scrapy-resilience developers"
project_copyright = "scrapy-resilience developers"
release = read_version(PACKAGE_INIT)
version = ".".join(release.split(".")[:2])

# sphinx.ext.autodoc is off for now because it imports the package, which this build
# avoids (see read_version). intersphinx is off because it downloads other projects'
# object inventories at build time. That download fails on a machine without internet
# access, and with -W it fails the whole build.
extensions: list[str] = []

root_doc = "index"
exclude_patterns = ["_build"]
language = "en"

# Warn about every cross-reference whose target is not found. `make docs` also
# passes -n, which sets the same option.
nitpicky = True

# alabaster is installed as a dependency of Sphinx, so the build downloads no theme.
html_theme = "alabaster"
html_title = f"scrapy-resilience {release}"
