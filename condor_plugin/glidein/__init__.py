"""The glidein: what an HTCondor job carries to a worker node to start the agent.

- `condor_plugin.glidein.package`: the package (wheelhouse + splitpilot's node wheel), the startup script
  (glidein_startup.sh) and batches;
- `condor_plugin.glidein.nodewheel`: the node wheel's metadata: pilot/ and splitpilot/ only.
"""
