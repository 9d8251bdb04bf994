"""Reconstruction floor of autoencoders (rFID, PSNR): ``python tools/rfid.py ...`` is ``latentdiff rfid ...``.

The code lives in latentdiff/cli/rfid.py; ``--help`` lists the options.
"""

import sys

from latentdiff.cli.main import run_tool

if __name__ == "__main__":
    sys.exit(run_tool("rfid"))
