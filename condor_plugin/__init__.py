"""HTCondor side of splitpilot: glidein packaging, the factory, mini-condor.

Empty until the HTCondor integration lands (issue 6).
"""
