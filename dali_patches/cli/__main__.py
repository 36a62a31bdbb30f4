"""``python -m dali_patches.cli``: the ``dali-patches`` command."""

import sys

from .main import main

sys.exit(main())
