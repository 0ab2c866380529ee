"""
echotw's tests. L{ROOT} is the checkout they test, found by looking upward
for C{pyproject.toml}, so that a test module or helper finds it at any depth.
"""

from pathlib import Path


def _checkoutRoot() -> Path:
    here = Path(__file__).resolve()
    for directory in here.parents:
        if (directory / "pyproject.toml").is_file():
            return directory
    raise RuntimeError(f"no pyproject.toml above {here}")


ROOT = _checkoutRoot()
