"""HTTP server: ``python tools/serve.py ...`` is ``latentdiff serve ...``.

The code lives in latentdiff/cli/serve.py; ``--help`` lists the options.
"""

import sys

from latentdiff.cli.main import run_tool

if __name__ == "__main__":
    sys.exit(run_tool("serve"))
