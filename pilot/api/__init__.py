"""The broker's API as its clients see it: what a node (agent, wrapper) and a user need.

- `pilot.api.client`: BrokerClient (user), AgentClient, JobClient, AdminClient over mutual TLS;
- `pilot.api.jobclient`: JobClient itself, which never loads `cryptography` (the wrapper's client);
- `pilot.api.base`: what every client shares (the channel from PEM bytes, the errors);
- `pilot.api.states`: job states and reading a peer's state number;
- `pilot.api.files`: sandbox names, sizes and digests, checked on both sides of the network;
- `pilot.api.jobfile`: the TOML job description a user submits (and `agent --dry-run` reads);
- `pilot.api.outdir`: writing downloaded outputs safely.

Nothing here imports the broker server: the server imports these.
"""
