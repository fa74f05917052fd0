"""Where bundled data lives, in a source checkout and in an installed wheel.

Knows: the layout of the repository and of the wheel. Nothing else.
In the wheel, the top-level `weights/` folder is installed as `refcomplete/weights/`;
in a source checkout it sits beside the package.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def weights_dir() -> Path:
    """The folder holding the bundled tokenizer ranks and models."""
    installed = _PACKAGE / "weights"
    if installed.is_dir():
        return installed
    return _PACKAGE.parent / "weights"
