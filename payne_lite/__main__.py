"""``python -m payne_lite`` is ``payne-lite``."""

import sys

from .cli import main

sys.exit(main())
