"""HTCondor side of splitpilot: the mini-condor, glidein packaging, the factory.

- `condor_plugin.minicondor`: a real HTCondor pool on one machine (MiniCondor),
  in a cached Debian 13 node root where the host has no condor_master;
- `condor_plugin.noderoot`, `nodedaemons`, `nodeproc`: building the root,
  configuring the daemons, checking nothing is left behind;
- `condor_plugin.minicondor_cli`: `splitpilot minicondor start|stop|status|env|build`.
"""
