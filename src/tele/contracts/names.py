"""Names of cluster objects that one side creates and another must find.

`STATE_CONFIGMAP`: the manager keeps the workloads that get an agent there (tele.manager.state);
uninstalling the Helm release removes it with the release (tele.helm.ops).
"""

from __future__ import annotations

STATE_CONFIGMAP = "traffic-manager-state"
