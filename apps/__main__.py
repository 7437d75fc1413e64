"""`python -m apps` is the `splitpilot` command."""

import sys

from apps.cli import main

sys.exit(main())
