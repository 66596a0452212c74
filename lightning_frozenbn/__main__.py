"""``python -m lightning_frozenbn``: the same command as ``lightning-frozenbn``."""

from lightning_frozenbn.cli import main

if __name__ == "__main__":
    main()
