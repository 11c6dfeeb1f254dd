"""Contracts between tele's processes that more than one side must read the same way.

The agent configuration (written by the manager's webhook, read by the agent and the daemon)
and namespace selection (rendered by the Helm chart, followed by the manager) live here, so that
no side imports another side's package. Nothing here does I/O.
"""
