"""The chart with the real Helm: lint, schema errors naming the value's path, rendered scope
(cluster-wide, static, dynamic), the manager's env contract, and value flag parsing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tele.contracts.namespaces import NamespaceSelector
from tele.helm.chart import Chart, chart_dir, lint_blocking
from tele.helm.errors import ValuesError
from tele.helm.values import ValueSources
from tele.manager.server import ManagerConfig

Obj = dict[str, Any]


def render(chart: Chart, values: Obj, namespace: str = "ambassador") -> list[Obj]:
    return chart.render_blocking(values, release="traffic-manager", namespace=namespace)


def find(objects: list[Obj], kind: str, name: str, namespace: str = "") -> Obj:
    for obj in objects:
        meta = obj["metadata"]
        if (obj["kind"], meta["name"], meta.get("namespace", "")) == (kind, name, namespace):
            return obj
    raise AssertionError(f"{kind} {namespace}/{name} not rendered")


def kinds(objects: list[Obj]) -> list[tuple[str, str, str]]:
    return [(o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]) for o in objects]


def manager_env(objects: list[Obj]) -> dict[str, str]:
    deployment = find(objects, "Deployment", "traffic-manager", "ambassador")
    env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    return {e["name"]: e.get("value", "") for e in env if "value" in e}


def test_chart_ships_inside_the_package() -> None:
    path = chart_dir()
    assert path.is_relative_to(Path(__file__).parents[2] / "src" / "tele")
    assert {"Chart.yaml", "values.yaml", "values.schema.json"} <= {p.name for p in path.iterdir()}


def test_lint_is_clean_with_defaults_and_with_each_scope() -> None:
    for values in (
        {},
        {"namespaces": ["alpha", "beta"]},
        {"namespaceSelector": {"matchLabels": {"env": "dev"}}},
        {"agentInjector": {"enabled": False}, "workloads": {"argoRollouts": {"enabled": True}}},
    ):
        messages = lint_blocking(values, namespace="ambassador", strict=True)
        assert [m for m in messages if m.severity >= 2] == [], values


def test_lint_reports_broken_values_with_their_path() -> None:
    messages = lint_blocking({"agent": {"port": "x"}}, namespace="ambassador")
    errors = [m for m in messages if m.severity == 3]
    assert errors and any("/agent/port" in m.text for m in errors)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"bogus": 1}, "Unknown Helm value bogus: the chart's schema does not allow it."),
        ({"agent": {"image": {"nmae": "x"}}}, "Unknown Helm value agent.image.nmae"),
        ({"agent": {"port": "x"}}, "Invalid Helm value agent.port: got string, want integer."),
        (
            {"workloads": {"deployments": {"enabled": "yes"}}},
            "Invalid Helm value workloads.deployments.enabled: got string, want boolean.",
        ),
        (
            {"timeouts": {"sessionLease": "5x"}},
            "Invalid Helm value timeouts.sessionLease: '5x' is not a duration like 60s",
        ),
        (
            {"namespaces": ["ok", "Not_OK"]},
            "Invalid Helm value namespaces[1]: 'Not_OK' is not a lowercase DNS name",
        ),
        (
            {"agentInjector": {"webhook": {"failurePolicy": "Sometimes"}}},
            "Invalid Helm value agentInjector.webhook.failurePolicy",
        ),
        (
            {"namespaces": ["a"], "namespaceSelector": {"matchLabels": {"x": "y"}}},
            "namespaces and namespaceSelector are mutually exclusive",
        ),
        (
            {"workloads": {"deployments": None}},
            "Helm value workloads.deployments is required and must not be null.",
        ),
        (
            {"namespaceSelector": {"matchExpressions": [{"key": "x", "operator": "In"}]}},
            "Invalid namespace scope: operator In on x needs values.",
        ),
    ],
)
def test_bad_values_fail_with_one_sentence_naming_the_path(
    chart: Chart, values: Obj, message: str
) -> None:
    with pytest.raises(ValuesError) as info:
        render(chart, values)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_cluster_wide_by_default(chart: Chart) -> None:
    objects = render(chart, {})
    cluster_role = find(objects, "ClusterRole", "traffic-manager-ambassador")
    resources = {r for rule in cluster_role["rules"] for r in rule["resources"]}
    assert {"namespaces", "pods", "pods/eviction", "deployments"} <= resources
    assert not [k for k in kinds(objects) if k[0] == "Role" and k[1] != "ambassador"]
    webhook = find(objects, "MutatingWebhookConfiguration", "agent-injector-webhook-ambassador")
    hook = webhook["webhooks"][0]
    assert hook["namespaceSelector"]["matchExpressions"][0]["operator"] == "NotIn"
    assert hook["failurePolicy"] == "Ignore"
    assert "caBundle" not in hook["clientConfig"]
    assert hook["clientConfig"]["service"] == {
        "name": "agent-injector",
        "namespace": "ambassador",
        "path": "/traffic-agent",
        "port": 443,
    }
    assert [r["operations"] for r in hook["rules"]] == [["CREATE", "DELETE"]]
    # Helm's install order: RBAC before the Deployment, the webhook last.
    order = [k[0] for k in kinds(objects)]
    assert (
        order.index("ClusterRole")
        < order.index("Deployment")
        < order.index("MutatingWebhookConfiguration")
    )


def test_static_namespaces_get_a_role_each(chart: Chart) -> None:
    objects = render(chart, {"namespaces": ["beta", "alpha"]})
    for ns in ("alpha", "beta"):
        role = find(objects, "Role", "traffic-manager-ambassador", ns)
        assert any("pods" in rule["resources"] for rule in role["rules"])
        binding = find(objects, "RoleBinding", "traffic-manager-ambassador", ns)
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "traffic-manager", "namespace": "ambassador"}
        ]
    cluster_role = find(objects, "ClusterRole", "traffic-manager-ambassador")
    resources = {r for rule in cluster_role["rules"] for r in rule["resources"]}
    assert resources == {
        "namespaces",
        "services",
        "mutatingwebhookconfigurations",
        "tokenreviews",  # who its callers are (security.authentication.mode)
        "subjectaccessreviews",  # what they may do
    }
    named = [rule for rule in cluster_role["rules"] if rule["resources"] == ["services"]]
    assert named == [
        {
            "apiGroups": [""],
            "resources": ["services"],
            "resourceNames": ["kube-dns"],
            "verbs": ["get"],
        }
    ]
    hook = find(objects, "MutatingWebhookConfiguration", "agent-injector-webhook-ambassador")
    assert hook["webhooks"][0]["namespaceSelector"] == {
        "matchExpressions": [
            {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["alpha", "beta"]}
        ]
    }


def test_a_name_only_selector_is_static_like_namespaces(chart: Chart) -> None:
    selector = {
        "matchExpressions": [
            {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["alpha", "beta"]}
        ]
    }
    short = kinds(render(chart, {"namespaces": ["alpha", "beta"]}))
    assert kinds(render(chart, {"namespaceSelector": selector})) == short


def test_dynamic_selector_needs_cluster_roles(chart: Chart) -> None:
    selector = {
        "matchLabels": {"example.com/managed": "true"},
        "matchExpressions": [
            {"key": "example.com/environment", "operator": "In", "values": ["dev", "qa"]}
        ],
    }
    objects = render(chart, {"namespaceSelector": selector})
    cluster_role = find(objects, "ClusterRole", "traffic-manager-ambassador")
    assert any("pods" in rule["resources"] for rule in cluster_role["rules"])
    assert not [k for k in kinds(objects) if k[0] == "Role" and k[1] != "ambassador"]
    hook = find(objects, "MutatingWebhookConfiguration", "agent-injector-webhook-ambassador")
    assert hook["webhooks"][0]["namespaceSelector"] == selector


def test_manager_env_follows_the_values_and_parses_as_the_manager_does(chart: Chart) -> None:
    values = {
        "namespaces": ["alpha"],
        "logLevel": "debug",
        "timeouts": {"sessionLease": "5s"},
        "podCIDRs": ["10.244.0.0/16"],
        "workloads": {"statefulSets": {"enabled": False}, "argoRollouts": {"enabled": True}},
        "agent": {"image": {"registry": "example.com/tele", "tag": "9.9"}, "port": 9911},
    }
    objects = render(chart, values, namespace="mgr")
    deployment = find(objects, "Deployment", "traffic-manager", "mgr")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "tele/traffic-manager:0.1.0"
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "api": 8081,
        "https": 8443,
    }
    assert container["readinessProbe"]["tcpSocket"] == {"port": "api"}
    env = {e["name"]: e for e in container["env"]}
    assert env["TELE_MANAGER_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.namespace"
    )
    plain = {k: v["value"] for k, v in env.items() if "value" in v}
    assert plain["TELE_LOG_LEVEL"] == "debug"
    # The agent's image is the manager's (one image), with the agent's own registry and tag.
    assert plain["TELE_AGENT_IMAGE"] == "example.com/tele/tele/traffic-manager:9.9"
    assert plain["TELE_AGENT_PORT"] == "9911"
    assert plain["TELE_WEBHOOK_NAME"] == "agent-injector-webhook-mgr"
    assert plain["TELE_WEBHOOK_SECRET"] == "mutator-webhook-tls"
    assert json.loads(plain["TELE_WORKLOADS"]) == {
        "deployments": True,
        "replicaSets": True,
        "statefulSets": False,
        "argoRollouts": True,
    }
    config = ManagerConfig.from_env({**plain, "TELE_MANAGER_NAMESPACE": "mgr"})
    assert config.selector == NamespaceSelector.for_names(["alpha"])
    assert config.session_lease == 5.0
    assert config.pod_subnets == ("10.244.0.0/16",)
    assert config.workloads == ("deployments", "replicaSets", "argoRollouts")
    assert config.api_port == 8081
    assert (config.webhook_port, config.webhook_name) == (8443, "agent-injector-webhook-mgr")
    assert config.webhook_secret == "mutator-webhook-tls"


@pytest.mark.parametrize(
    "values",
    [{}, {"namespaces": ["alpha"]}, {"namespaceSelector": {"matchLabels": {"env": "dev"}}}],
)
def test_the_chart_has_no_hooks_so_no_hooks_asks_for_nothing_more(
    chart: Chart, values: Obj
) -> None:
    """`tele helm install/upgrade --no-hooks` (Telepresence's flag) is accepted and changes
    nothing only because no template is a Helm hook: a hook added later must revisit it."""
    hooks = [
        f"{o['kind']}/{o['metadata']['name']}"
        for o in render(chart, values)
        if "helm.sh/hook" in (o["metadata"].get("annotations") or {})
    ]
    assert hooks == []


def test_injector_disabled_renders_no_webhook(chart: Chart) -> None:
    objects = render(chart, {"agentInjector": {"enabled": False}})
    assert "MutatingWebhookConfiguration" not in {k[0] for k in kinds(objects)}
    assert ("Service", "ambassador", "agent-injector") not in kinds(objects)
    env = manager_env(objects)
    assert (env["TELE_WEBHOOK_NAME"], env["TELE_WEBHOOK_PORT"]) == ("", "")
    assert ManagerConfig.from_env(env).webhook_port is None


def test_value_flags_parse_like_helm(tmp_path: Path) -> None:
    first = tmp_path / "one.yaml"
    first.write_text("logLevel: debug\nnamespaces: [x]\nagent:\n  port: 9000\n  logLevel: info\n")
    second = tmp_path / "two.yaml"
    second.write_text("agent:\n  port: 9100\n")
    values = ValueSources(
        files=[str(first), str(second)],
        set=["namespaces={alpha,beta}", "agentInjector.webhook.timeoutSeconds=7", "x.on=true"],
        set_string=["image.tag=1.10"],
        set_json=['namespaceSelector={"matchLabels":{"a":"b"}}'],
    ).build()
    assert values == {
        "logLevel": "debug",
        "namespaces": ["alpha", "beta"],  # --set replaces the list from the file
        "agent": {"port": 9100, "logLevel": "info"},  # later files merge over earlier ones
        "agentInjector": {"webhook": {"timeoutSeconds": 7}},
        "x": {"on": True},
        "image": {"tag": "1.10"},  # a string, not the number 1.1
        "namespaceSelector": {"matchLabels": {"a": "b"}},
    }


@pytest.mark.parametrize(
    ("sources", "message"),
    [
        (ValueSources(set=["novalue"]), "Cannot parse --set 'novalue'"),
        (ValueSources(files=["/nonexistent/values.yaml"]), "Cannot read values file"),
    ],
)
def test_bad_value_flags_are_one_sentence(sources: ValueSources, message: str) -> None:
    with pytest.raises(ValuesError) as info:
        sources.build()
    assert message in str(info.value)


def test_a_values_file_must_be_a_map(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ValuesError) as info:
        ValueSources(files=[str(path)]).build()
    assert str(info.value) == f"Values file {path} must hold a map of values at the top level."


KITCHEN_SINK: Obj = {
    "image": {"registry": "registry.example.com/", "name": "tele/traffic-manager", "tag": "1.2"},
    "imagePullSecrets": [{"name": "pull"}],
    "resources": {"limits": {"cpu": "500m", "memory": "128Mi"}, "requests": {"cpu": 0.1}},
    "securityContext": {"runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}},
    "podAnnotations": {"example.com/a": "1"},
    "podLabels": {"team": "dev"},
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "k", "operator": "Exists", "effect": "NoSchedule"}],
    "affinity": {"nodeAffinity": {}},
    "priorityClassName": "high",
    "serviceCIDRs": ["10.96.0.0/12"],
    "agent": {"resources": {"limits": {"memory": "64Mi"}}, "mountPolicies": {"/tmp": "Local"}},
}


def test_every_value_lands_where_it_should(chart: Chart) -> None:
    assert [m for m in lint_blocking(KITCHEN_SINK, namespace="ambassador") if m.severity >= 2] == []
    objects = render(chart, KITCHEN_SINK)
    pod = find(objects, "Deployment", "traffic-manager", "ambassador")["spec"]["template"]
    spec, container = pod["spec"], pod["spec"]["containers"][0]
    assert container["image"] == "registry.example.com/tele/traffic-manager:1.2"
    assert container["resources"] == KITCHEN_SINK["resources"]
    assert container["securityContext"] == KITCHEN_SINK["securityContext"]
    assert pod["metadata"]["annotations"] == {"example.com/a": "1"}
    assert pod["metadata"]["labels"]["team"] == "dev"
    assert pod["metadata"]["labels"]["app"] == "traffic-manager"
    assert spec["imagePullSecrets"] == [{"name": "pull"}]
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert spec["tolerations"] == KITCHEN_SINK["tolerations"]
    assert spec["priorityClassName"] == "high"
    env = manager_env(objects)
    assert env["TELE_SERVICE_CIDRS"] == "10.96.0.0/12"
    assert json.loads(env["TELE_AGENT_RESOURCES"]) == {"limits": {"memory": "64Mi"}}
    assert json.loads(env["TELE_MOUNT_POLICIES"]) == {"/tmp": "Local"}


@pytest.mark.parametrize("values", [{}, {"namespaces": ["alpha", "beta"]}])
def test_rollout_rbac_follows_the_argo_rollouts_value(chart: Chart, values: Obj) -> None:
    def rollout_rules(enabled: bool) -> list[Obj]:
        objects = render(chart, {**values, "workloads": {"argoRollouts": {"enabled": enabled}}})
        return [
            rule
            for obj in objects
            if obj["kind"] in ("Role", "ClusterRole")
            for rule in obj.get("rules") or []
            if "argoproj.io" in rule.get("apiGroups", [])
        ]

    assert rollout_rules(False) == []  # the manager never watches Rollouts then
    enabled = rollout_rules(True)
    assert enabled and all(r["resources"] == ["rollouts"] for r in enabled)
    assert all({"list", "watch", "patch"} <= set(r["verbs"]) for r in enabled)


def test_one_image_for_manager_and_agent_and_image_registry_moves_both(chart: Chart) -> None:
    def images(values: Obj) -> tuple[str, str]:
        deployment = find(render(chart, values), "Deployment", "traffic-manager", "ambassador")
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        return container["image"], env["TELE_AGENT_IMAGE"]

    assert images({}) == ("tele/traffic-manager:0.1.0", "tele/traffic-manager:0.1.0")
    assert images({"image": {"registry": "localhost:5001"}}) == (
        "localhost:5001/tele/traffic-manager:0.1.0",
        "localhost:5001/tele/traffic-manager:0.1.0",
    )
    assert images({"image": {"tag": "dev"}, "agent": {"image": {"name": "me/agent"}}}) == (
        "tele/traffic-manager:dev",
        "me/agent:dev",
    )


def test_authentication_mode_is_enforcing_by_default_and_validated(chart: Chart) -> None:
    def env(values: Obj) -> dict[str, str]:
        return manager_env(render(chart, values))

    def cluster_rules(values: Obj) -> list[Obj]:
        role = find(render(chart, values), "ClusterRole", "traffic-manager-ambassador")
        reviews = (["tokenreviews"], ["subjectaccessreviews"])
        return [r for r in role["rules"] if r["resources"] in reviews]

    assert env({})["TELE_AUTH_MODE"] == "enforcing"
    assert cluster_rules({}) == [
        {
            "apiGroups": ["authentication.k8s.io"],
            "resources": ["tokenreviews"],
            "verbs": ["create"],
        },
        {
            "apiGroups": ["authorization.k8s.io"],
            "resources": ["subjectaccessreviews"],
            "verbs": ["create"],
        },
    ]
    disabled = {"security": {"authentication": {"mode": "disabled"}}}
    assert env(disabled)["TELE_AUTH_MODE"] == "disabled"
    assert cluster_rules(disabled) == []
    with pytest.raises(ValuesError, match="mode"):
        render(chart, {"security": {"authentication": {"mode": "off"}}})
