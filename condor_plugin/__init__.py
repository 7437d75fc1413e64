"""HTCondor side of splitpilot: glidein packaging, the factory, and (for tests and demos) the mini-condor.

- `condor_plugin.glidein`: the glidein package (pilot/ + splitpilot/ wheel, wheelhouse, startup script) and
  batches (`package`), the node wheel's own metadata (`nodewheel`);
- `condor_plugin.factory`: the factory's pure scaling policy (`policy`), what the broker says (`brokerview`),
  and the loop that observes and acts on a schedd (`factory`);
- `condor_plugin.testing`: the mini-condor, a real HTCondor pool on one machine (`minicondor`, `noderoot`,
  `nodedaemons`, `nodeproc`, `cli` for `splitpilot minicondor ...`). Never shipped in glideins; glidein/ and
  factory/ never import it (the import-linter contract).
"""
