"""``python -m jaxattn.cli``: the same as the ``jaxattn`` console script."""

import sys

from jaxattn.cli import main

sys.exit(main())
