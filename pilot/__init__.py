"""splitpilot: a split, two-layer job pilot for HTCondor grid sites.

The job agent (holding an agent token) matches jobs at the broker and starts
one job wrapper per job (holding only that job's token), talking to it over
the wrapper's stdin/stdout with length-delimited protobuf frames.
"""

__version__ = "0.1.0"
