"""List every bad image file of a folder without training.

    python -m zoo.data.scan DIR [--max-pixels N] [--jobs J]

Prints one line a bad file (`path: reason`) and a summary; exit code 0 when every image file is
readable, 1 when bad files were found, 2 when DIR is not a folder. The work is
`zoo.data.scan_folder` (in `zoo.data.scanner`; this module is only the command, so that
`python -m` does not run a module the package has already imported).
"""

import sys

from zoo.data.scanner import main

if __name__ == "__main__":
    sys.exit(main())
