"""``python -m pipeline.cli``: the `pipeline` command."""

import sys

from pipeline.cli.app import main

sys.exit(main())
