"""``python -m cae_kernels`` runs the ``cae`` command (also under ``torchrun -m cae_kernels``)."""

import sys

from .app.cli import main

sys.exit(main())
