"""``python -m sib_fast.bench`` is ``sib-bench``."""
import sys

from sib_fast.bench.cli import main

sys.exit(main())
