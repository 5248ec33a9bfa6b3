"""``python -m pipeline.cli``: the `pipeline` command."""

import sys

from pipeline.cli.commands import main

sys.exit(main())
