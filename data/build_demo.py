"""Build the embedded demo benchmark into data/cache/demo (same as `remap demo-data`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from remap_lib.app.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["demo-data", *sys.argv[1:]]))
