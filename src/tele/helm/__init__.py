"""`tele helm`: the traffic-manager chart rendered by the real Helm (helm-python-sdk) and applied
with tele's own Kubernetes client, with a release record per install so that upgrade prunes and
uninstall removes exactly what an install created."""
