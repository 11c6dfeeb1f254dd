"""Commands that need a cluster session: `tele connect` and `tele list`."""

from __future__ import annotations

import os
from typing import Any, TypeVar

import click

from tele.cli import docker_cmd
from tele.cli.output import emit, output_option

T = TypeVar("T")


def connection_lines(info: dict[str, Any]) -> list[str]:
    """The human form of a ConnectionInfo (shared with `tele status`)."""
    lines = [
        f"  Kubernetes server:  {info['kube_server']}",
        f"  Kubernetes context: {info['kube_context']}",
        f"  Namespace:          {info['namespace']}",
        f"  Manager namespace:  {info['manager_namespace']}",
    ]
    if info.get("manager_version"):
        lines.append(f"  Manager:            v{info['manager_version']} ({info['manager_pod']})")
    if info.get("session_id"):
        lines.append(f"  Session:            {info['session_id']}")
    managed = info.get("managed_namespaces") or []
    lines.append(f"  Managed namespaces: {', '.join(managed) if managed else '(none)'}")
    if info.get("mapped_namespaces"):
        lines.append(f"  Mapped namespaces:  {', '.join(info['mapped_namespaces'])}")
    subnets = [*(info.get("pod_subnets") or []), *(info.get("service_subnets") or [])]
    if subnets:
        lines.append(f"  Cluster subnets:    {', '.join(subnets)}")
    if info.get("reconnects"):
        lines.append(f"  Reconnects:         {info['reconnects']}")
    if info.get("last_reconnect"):
        lines.append(f"  Last reconnect:     {info['last_reconnect']}")
    intercepts = info.get("intercepts") or []
    lines.append(f"  Intercepts:         {len(intercepts)} total")
    lines.extend(f"    {line}" for line in intercepts)
    # The serving pod of an engagement was replaced: its --to-pod forwards and volumes moved.
    lines.extend(
        f"    {e['pod_change']}" for e in info.get("engagements") or [] if e.get("pod_change")
    )
    network = info.get("network")
    if network:
        lines.append(f"  Network:            {network.get('device')} {network.get('address')}")
        lines.append(f"  Routed subnets:     {', '.join(network.get('subnets') or [])}")
        for key, label in (
            ("also_proxy", "Also proxy"),
            ("never_proxy", "Never proxy"),
            ("allow_conflicting", "Allow conflicts"),
        ):
            if network.get(key):
                lines.append(f"  {label + ':':<20}{', '.join(network[key])}")
        vnat = network.get("vnat")
        if isinstance(vnat, dict):
            lines.append(
                f"  Virtual IPs:        {vnat.get('subnet')} for "
                f"{', '.join(vnat.get('translated') or [])} ({vnat.get('mapped', 0)} in use)"
            )
        for route in network.get("proxy_via") or []:
            pods = ", ".join(route.get("pods") or []) or "none: its route is lost (see Last error)"
            lines.append(
                f"  Proxy via:          {route.get('subnet')} from {route.get('workload')} "
                f"(pods {pods})"
            )
        dns = network.get("dns")
        if isinstance(dns, dict):
            suffixes = ", ".join(dns.get("include_suffixes") or []) or "cluster names"
            lines.append(
                f"  DNS:                {dns.get('local_ip')} for {suffixes}; "
                f"{dns.get('queries', 0)} queries"
            )
        lines.append(
            # The device's input is what local programs send towards the cluster.
            f"  Traffic:            {_size(network.get('bytes_in', 0))} to the cluster, "
            f"{_size(network.get('bytes_out', 0))} back; "
            f"{network.get('tcp_connections', 0)} TCP connections, "
            f"{network.get('udp_flows', 0)} UDP flows, {network.get('refused', 0)} refused"
        )
        if isinstance(dns, dict):
            if dns.get("excludes"):
                lines.append(f"  DNS excludes:       {', '.join(dns['excludes'])}")
            for name, alias in (dns.get("mappings") or {}).items():
                lines.append(f"  DNS mapping:        {name} -> {alias}")
        if network.get("set_up_by", "daemon") != "daemon":
            lines.append(f"  Set up by:          {network['set_up_by']}")
    # A failed session's error is why it ended: `tele status` says that first.
    if info.get("last_error") and info.get("status") != "failed":
        lines.append(f"  Last error:         {info['last_error']}")
    return lines


def _size(value: object) -> str:
    """Bytes for people: 1.2 MB, 340 kB, 12 B."""
    number = float(value) if isinstance(value, int | float) else 0.0
    for unit in ("B", "kB", "MB", "GB"):
        if number < 1000 or unit == "GB":
            return f"{number:.0f} {unit}" if unit == "B" else f"{number:.1f} {unit}"
        number /= 1000
    raise AssertionError("unreachable")  # pragma: no cover


@click.command()
@docker_cmd.connect_options
@click.option("--kubeconfig", default="", help="The kubeconfig to use (default: $KUBECONFIG).")
@click.option("--context", default="", help="The kubeconfig context (default: its current one).")
@click.option("--namespace", "-n", default="", help="The default namespace for names.")
@click.option(
    "--manager-namespace", default="", help="Where the traffic manager runs (default: ambassador)."
)
@click.option(
    "--mapped-namespaces",
    default="",
    help="Comma-separated namespaces to reach (default: all the manager manages).",
)
@click.option("--manager-address", default="", hidden=True, help="host:port of a manager (dev).")
@click.option(
    "--vif/--no-vif",
    default=None,
    help="Route the cluster's subnets and names here (with sudo when needed), or never; "
    "default: when the daemon can, or sudo works without a password.",
)
@click.option(
    "--also-proxy", multiple=True, help="Also route this CIDR to the cluster (repeatable)."
)
@click.option("--never-proxy", multiple=True, help="Never route this CIDR to the cluster.")
@click.option(
    "--allow-conflicting-subnets",
    multiple=True,
    help="Route this CIDR even if a local route has it.",
)
@click.option(
    "--vnat",
    multiple=True,
    help="Give this cluster CIDR (or pods, service, also, all) virtual IPs (config "
    "cluster.virtualIPSubnet) when it clashes with a local route: names resolve to virtual IPs "
    "routed through the manager (repeatable).",
)
@click.option(
    "--proxy-via",
    multiple=True,
    metavar="CIDR=WORKLOAD[.NAMESPACE]",
    help="Give this cluster CIDR (or pods, service, also, all) virtual IPs and send its "
    "connections and UDP flows from the pods of WORKLOAD (in the connected namespace, or in "
    "NAMESPACE) instead of the manager's; needs the virtual network interface (repeatable).",
)
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@output_option
def connect(
    command: tuple[str, ...],
    kubeconfig: str,
    context: str,
    namespace: str,
    manager_namespace: str,
    mapped_namespaces: str,
    manager_address: str,
    vif: bool | None,
    also_proxy: tuple[str, ...],
    never_proxy: tuple[str, ...],
    allow_conflicting_subnets: tuple[str, ...],
    vnat: tuple[str, ...],
    proxy_via: tuple[str, ...],
    output: str,
) -> None:
    """Connect this machine to the cluster through its traffic manager; with `-- COMMAND`,
    run COMMAND while connected, then disconnect (exiting with COMMAND's status)."""
    from tele.cli import client
    from tele.errors import UserError
    from tele.rpc import daemon_api

    if proxy_via and vif is False:
        raise UserError(
            "--proxy-via needs the virtual network interface (its subnets' virtual IPs are "
            "routed there), which --no-vif turns off; drop one of the two."
        )
    request = daemon_api.ConnectRequest(
        kubeconfig=os.path.abspath(kubeconfig) if kubeconfig else os.environ.get("KUBECONFIG", ""),
        context=context,
        namespace=namespace,
        manager_namespace=manager_namespace,
        mapped_namespaces=[n.strip() for n in mapped_namespaces.split(",") if n.strip()],
        manager_address=manager_address,
        vif=bool(vif),
        vif_when_possible=vif is None,
        also_proxy=_cidrs("--also-proxy", also_proxy),
        never_proxy=_cidrs("--never-proxy", never_proxy),
        allow_conflicting_subnets=_cidrs("--allow-conflicting-subnets", allow_conflicting_subnets),
        vnat=_vnat(vnat),
        proxy_via=list(proxy_via),
    )

    helper_note = ""
    if vif is True or (vif is None and os.environ.get("TELE_VIF") != "0"):

        async def prepare() -> str:
            from tele.cli.vif_helper import ensure_helper

            async with client.daemon_client(start=True) as rpc:
                assert rpc is not None
                return await ensure_helper(rpc, explicit=bool(vif))

        helper_note = client.run(prepare)

    async def call() -> daemon_api.ConnectionInfo:
        async with client.daemon_client(start=True) as rpc:
            assert rpc is not None
            # The daemon applies the connect timeout itself; this bound only guards a hang.
            return await client.show_progress(
                rpc,
                "Connecting to the cluster's traffic manager",
                lambda: rpc.call(daemon_api.CONNECT, request, timeout=180),
            )

    info = client.run(call)
    import tele

    if info.manager_version and info.manager_version != tele.__version__:
        click.echo(
            f"tele: warning: the traffic manager runs version {info.manager_version}, "
            f"this client {tele.__version__}; `tele helm upgrade` brings them together",
            err=True,
        )

    if vif is None and info.network is None and (helper_note or info.network_note):
        click.echo(
            "tele: note: connected without the virtual network interface: "
            f"{helper_note or info.network_note}; `tele connect --vif` sets it up with sudo",
            err=True,
        )

    def text(i: daemon_api.ConnectionInfo) -> str:
        from tele.cli.output import to_builtins

        return "\n".join(
            [
                f"Connected to context {i.kube_context} ({i.kube_server})",
                *connection_lines(to_builtins(i)),
            ]
        )

    emit(info, output, text)
    if command:
        _run_connected(command)


def _run_connected(command: tuple[str, ...]) -> None:
    """`tele connect -- COMMAND`: run it, then end the session (also on Ctrl-C or a failure
    to start it), and exit as COMMAND did."""
    import subprocess

    from tele.cli import client
    from tele.cli.intercept_cmd import exit_status
    from tele.rpc import daemon_api

    try:
        status = subprocess.run(list(command), check=False).returncode
    except OSError as exc:
        status = 127
        click.echo(f"tele: Cannot run {command[0]}: {exc.strerror or exc}.", err=True)
    except KeyboardInterrupt:
        status = 130
    finally:
        client.call_connected(daemon_api.DISCONNECT, daemon_api.Empty(), timeout=30)
    click.echo("Disconnected.", err=True)
    raise SystemExit(exit_status(status))


def _vnat(values: tuple[str, ...]) -> list[str]:
    """--vnat CIDRs, or the names pods, service, also, all (resolved by the daemon)."""
    names = ("pods", "service", "also", "all")
    named = [p.strip() for v in values for p in v.split(",") if p.strip() in names]
    others = tuple(p for v in values for p in v.split(",") if p.strip() not in names)
    return [*named, *_cidrs("--vnat", others)]


def _cidrs(flag: str, values: tuple[str, ...]) -> list[str]:
    """Comma-separated or repeated CIDRs, checked here so a typo is one clear sentence."""
    import ipaddress

    from tele.errors import UserError

    result = []
    for value in values:
        for part in filter(None, (p.strip() for p in value.split(","))):
            try:
                result.append(str(ipaddress.ip_network(part, strict=False)))
            except ValueError:
                raise UserError(f"{flag} {part!r} is not a CIDR like 10.0.0.0/8.") from None
    return result


@click.command(name="list")
@click.option("--namespace", "-n", default="", help="The namespace (default: the connected one).")
@click.option("--intercepts", "-i", is_flag=True, help="Only engaged workloads.")
@click.option("--agents", "-a", is_flag=True, help="Only workloads with a traffic agent.")
@click.option("--only-interceptable", is_flag=True, help="Only workloads that can be engaged.")
@output_option
def list_(
    namespace: str, intercepts: bool, agents: bool, only_interceptable: bool, output: str
) -> None:
    """List the workloads of a namespace that can be engaged, with their state."""
    from tele.cli import client
    from tele.rpc import daemon_api

    reply = client.call_connected(
        daemon_api.LIST, daemon_api.ListRequest(namespace=namespace), timeout=30, connect=True
    )
    from tele.cli.output import to_builtins
    from tele.rpc import filters

    # This session's own engagements, with what they take (mechanism, filters) and where it
    # goes: the manager's list names who engaged a workload, the daemon knows how.
    status = client.call_connected(daemon_api.STATUS, daemon_api.Empty(), timeout=10)
    from tele.cli.intercept_cmd import mounted_here

    own = {
        "engagements": [
            to_builtins(e) for e in (status.session.engagements if status.session else [])
        ]
    }
    # connect --docker: the mount points as this machine sees them, as `tele status` says them
    docker_cmd.show_host_mounts(own, mounted_here)
    shown = [
        {
            **to_builtins(w),
            "engagements": [
                e
                for e in own["engagements"]
                if (e["namespace"], e["workload"]) == (w.namespace, w.name)
            ],
        }
        for w in reply.workloads
        if (not intercepts or w.engaged_by)
        and (not agents or w.agent_installed)
        and (not only_interceptable or not w.not_interceptable_reason)
    ]

    def how(e: dict[str, Any]) -> str:
        taken = filters.describe(
            e["mechanism"],
            [tuple(h) for h in e["headers"]],
            e["path_equal"],
            e["path_prefix"],
            e["path_regex"],
        )
        where = f" -> {', '.join(e['local'])}" if e["local"] else ""
        pod = f", pod {e['pod_name']}" if e.get("pod_name") else ""
        return f"    {e['name']}: {e['kind']}, {taken}{where}{pod}"

    def text(rows: list[dict[str, Any]]) -> str:
        if not rows:
            if intercepts:
                return "No engaged workloads"
            if agents:
                return "No workloads with a traffic agent"
            return "No Workloads (Deployments, StatefulSets, ReplicaSets, or Rollouts)"
        lines = []
        for w in rows:
            if w["engaged_by"]:
                state = f"engaged by {', '.join(w['engaged_by'])}"
            elif w["not_interceptable_reason"]:
                state = f"not interceptable: {w['not_interceptable_reason']}"
            elif w["replicas"] == 0:
                state = "no replicas: scale it up to engage it"
            elif w["agent_pods"] and not w["agents_connected"]:
                state = (
                    "ready to engage (traffic-agent installed, not connected to the traffic "
                    "manager yet)"
                )
            elif w["agent_installed"]:
                state = "ready to engage (traffic-agent already installed)"
            else:
                state = "ready to engage (traffic-agent not yet installed)"
            replicas = f"{w['ready_replicas']}/{w['replicas']}"
            lines.append(f"{w['name']:<30} {w['kind']:<12} {replicas}  {state}")
            lines += [how(e) for e in w["engagements"]]
        return "\n".join(lines)

    emit(shown, output, text)


@click.command(name="list-namespaces")
@output_option
def list_namespaces(output: str) -> None:
    """The namespaces the connected traffic manager manages (where workloads can be engaged)."""
    from tele.cli import client
    from tele.rpc import daemon_api

    status = client.call_connected(daemon_api.STATUS, daemon_api.Empty(), timeout=10, connect=True)
    names = sorted(status.session.managed_namespaces) if status.session else []
    emit(names, output, lambda n: "\n".join(n) or "No namespaces are managed.")


@click.command(name="list-contexts")
@click.option("--kubeconfig", default="", help="The kubeconfig to read (default: $KUBECONFIG).")
@output_option
def list_contexts(kubeconfig: str, output: str) -> None:
    """The kubeconfig's contexts (the current one marked with *)."""
    import yaml

    from tele.errors import UserError

    text = kubeconfig or os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
    contexts: dict[str, dict[str, str]] = {}
    current = ""
    for path in [p for p in text.split(os.pathsep) if p]:
        try:
            with open(path) as file:
                config = yaml.safe_load(file) or {}
        except FileNotFoundError:
            continue  # as kubectl: a KUBECONFIG list may name files that are not there
        except (OSError, yaml.YAMLError) as exc:
            raise UserError(f"Cannot read the kubeconfig {path}: {exc}.") from None
        if not isinstance(config, dict):
            raise UserError(f"The kubeconfig {path} is not a kubeconfig (not a mapping).")
        current = current or str(config.get("current-context") or "")
        for entry in config.get("contexts") or []:
            if isinstance(entry, dict) and entry.get("name") not in contexts:
                context = entry.get("context") or {}
                contexts[str(entry.get("name"))] = {
                    "cluster": str(context.get("cluster") or ""),
                    "namespace": str(context.get("namespace") or ""),
                }
    rows = [{"name": n, **c, "current": n == current} for n, c in contexts.items()]

    def table(rows: list[dict[str, Any]]) -> str:
        if not rows:
            return "No contexts."
        return "\n".join(
            f"{'*' if r['current'] else ' '} {r['name']:<30} {r['cluster']:<30} {r['namespace']}"
            for r in rows
        )

    emit(rows, output, table)


@click.command(name="current-cluster-id")
@click.option("--kubeconfig", default="", help="The kubeconfig to use (default: $KUBECONFIG).")
@click.option("--context", default="", help="The kubeconfig context (default: its current one).")
@output_option
def current_cluster_id(kubeconfig: str, context: str, output: str) -> None:
    """The cluster's ID (the UID of its kube-system namespace, as Telepresence reports it)."""
    from tele.cli import client
    from tele.errors import UserError
    from tele.k8s import client as k8s

    async def read() -> dict[str, str]:
        async with k8s.open_kube_client(kubeconfig or None, context or None) as kube:
            try:
                namespace = await kube.get(k8s.NAMESPACES, "kube-system")
            except k8s.ApiError as exc:
                raise UserError(
                    f"Cannot read namespace kube-system (its UID is the cluster's ID): "
                    f"{exc.message.rstrip('.')}."
                ) from None
            return {
                "cluster_id": str((namespace.get("metadata") or {}).get("uid") or ""),
                "context": kube.connection.context,
            }

    emit(client.run(read), output, lambda d: d["cluster_id"])
