"""The traffic agent: the sidecar that owns a workload's engaged ports inside its pods.

`config` reads the injected configuration; `forward` listens on the agent ports (transparent to
the app unless engaged) and `upstream` opens the app's or a client's side; `matching` (sans-IO),
`http` (HTTP/1.1) and `h2c` (HTTP/2) route request by request, `tls` terminates TLS for them;
`engagements` is the interface to what is engaged and `manager_link` its traffic-manager
implementation; `init` is the init container's port redirect; `__main__` runs either program.
"""
