"""Container images: references, the OCI registry client, and tele's own image builder.

`reference` parses image names as a container runtime does, `registry` speaks the OCI
distribution API (pull and push), `build` writes reproducible OCI images without docker.
"""
