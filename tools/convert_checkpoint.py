"""Convert checkpoints between SD, diffusers and latentdiff formats:
``python tools/convert_checkpoint.py ...`` is ``latentdiff convert ...``.

The code lives in latentdiff/cli/convert.py; ``--help`` lists the options.
"""

import sys

from latentdiff.cli.main import run_tool

if __name__ == "__main__":
    sys.exit(run_tool("convert"))
