"""Container images of the sandbox: an image name maps to a Python entry point (see registry)."""
