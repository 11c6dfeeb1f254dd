"""The traffic agent: the sidecar that owns a workload's engaged ports inside its pods.

`config` reads the injected configuration, `forward` listens on the agent ports (transparent to
the app unless engaged), `matching` + `http` + `h2c` route HTTP request by request, `init` is the
init container's port redirect, and `__main__` runs either program.
"""
