"""`python -m pilot` is the `splitpilot` command."""

import sys

from pilot.cli import main

sys.exit(main())
