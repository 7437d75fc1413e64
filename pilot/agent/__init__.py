"""The job agent: what a glidein starts (see pilot.agent.agent and pilot.agent.cli)."""
