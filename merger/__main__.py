"""`python -m merger`: the `merger` command.

`python -m` puts the current directory first on sys.path, so a `numpy.py` in a recipe repository
would be imported in place of numpy: merger takes it off before anything else is imported.
"""

import os
import sys

if sys.path and sys.path[0] in ("", os.getcwd()):
    del sys.path[0]

from merger.cli.command import merger  # after the path is safe

if __name__ == "__main__":
    merger()
