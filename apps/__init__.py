"""The top of the layers: the `splitpilot` command and the demos.

- `apps.cli`: the `splitpilot` command; its subcommands come from the `splitpilot.commands` entry points
  (setup.cfg), each a `register(subparsers)` function in the module of its concept;
- `apps.demo`, `apps.localdemo`, `apps.condordemo`, `apps.demojobs`: `splitpilot demo` (protocol, local, condor);
- `apps.factory_cli`: `splitpilot glidein ...` and `splitpilot factory run` (it may start from a mini-condor's
  state folder, so it sits above both the factory and the mini-condor).

Nothing below imports this package (the import-linter contract in setup.cfg).
"""
