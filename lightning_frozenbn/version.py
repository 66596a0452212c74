"""The package version, in one place: pyproject.toml's ``version`` (a test compares the two)."""

__version__ = "0.1.0"
