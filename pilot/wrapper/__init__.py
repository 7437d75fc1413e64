"""The job wrapper: runs one job with its job token, started only by the agent.

Entry point: `python -m pilot.wrapper` (lean: it imports only what running a
job needs), also reachable as `splitpilot wrapper`. It speaks the pipe
protocol on its stdin/stdout (see docs/protocol.md) and must run inside
images that do not contain splitpilot: the software area brings the code.
"""
