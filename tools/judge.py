"""Class accuracy of generated images by the CIFAR-10 judge: ``python tools/judge.py ...`` is ``latentdiff judge ...``.

The code lives in latentdiff/cli/judge.py; ``--help`` lists the options.
"""

import sys

from latentdiff.cli.main import run_tool

if __name__ == "__main__":
    sys.exit(run_tool("judge"))
