"""The glidein factory: keeps glideins in line with the broker's waiting jobs.

- `condor_plugin.factory.policy`: the decisions, a pure object (observation in, decision out);
- `condor_plugin.factory.brokerview`: what the broker says (waiting jobs that fit a glidein, pilot records);
- `condor_plugin.factory.factory`: the loop: observe the broker and the schedd, let the policy decide, submit
  and remove glideins through the htcondor2 bindings.
"""
