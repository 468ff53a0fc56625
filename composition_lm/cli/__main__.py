"""``python -m composition_lm.cli``: the console script (e.g. under ``accelerate launch``)."""

import sys

from composition_lm.cli import main

sys.exit(main())
