"""``python -m latentdiff <command> ...`` is ``latentdiff <command> ...``."""

from latentdiff.cli.main import console_main

if __name__ == "__main__":
    console_main()
