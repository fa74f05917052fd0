"""Where bundled data lives, in a source checkout and in an installed wheel.

Knows: the layout of the repository and of the wheel. Nothing else.
In the wheel, the top-level `weights/` folder is installed as `refcomplete/weights/`
and the bundled model's golden suite `tests/golden/` as `refcomplete/golden_suite/`;
in a source checkout they sit beside the package.
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


def golden_suite_dir() -> Path:
    """The golden suite of the bundled model (`refcomplete compare`'s default)."""
    installed = _PACKAGE / "golden_suite"
    if installed.is_dir():
        return installed
    return _PACKAGE.parent / "tests" / "golden"
