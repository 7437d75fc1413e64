"""The mini-condor: a real HTCondor pool on this machine, for tests and `splitpilot demo`.

Not part of what is shipped to nodes: glidein/ and factory/ never import it (the import-linter contract).
- `minicondor`: the pool (MiniCondor) and its lifecycle;
- `noderoot`, `nodedaemons`, `nodeproc`: the cached Debian 13 node root, the daemons, leftover checks;
- `cli`: `splitpilot minicondor start|stop|status|env|build`.
"""
