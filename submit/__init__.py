"""Glidein submit descriptions, built as dicts and rendered at the end.

Empty until the HTCondor integration lands (issue 6).
"""
