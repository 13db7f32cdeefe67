"""``python -m bdlens`` is the ``bdlens`` command (used by ``torchrun -m bdlens``)."""

import sys

from bdlens.cli import main

sys.exit(main())
