"""`python -m pilot.wrapper`: the wrapper process the agent starts."""

import sys

from pilot.wrapper.cli import main

sys.exit(main())
