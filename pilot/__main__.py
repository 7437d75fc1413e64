"""`python -m pilot` is the node's command (agent, wrapper, pipe dump): see pilot.cli."""

import sys

from pilot.cli import main

sys.exit(main())
