"""``python -m neuromask_pl.analysis RUN_DIR``: ``neuromask-pl analyze RUN_DIR`` without importing torch."""

import sys

from neuromask_pl.analysis.command import main

if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, OSError) as error:
        print(f"neuromask-pl analyze: error: {error}", file=sys.stderr)
        sys.exit(2)
