"""``python -m lightning_frozenbn [detect]``: the ``lightning-frozenbn`` [``-detect``] command."""

import sys

from lightning_frozenbn.cli import detect_main, main

if __name__ == "__main__":
    if sys.argv[1:2] == ["detect"]:  # for launchers that take a module, e.g. torchrun -m lightning_frozenbn detect fit
        detect_main(sys.argv[2:])
    else:
        main()
