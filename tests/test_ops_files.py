"""Static checks of the operations files: compose, Dockerfile, Prometheus, Alertmanager, Grafana.

Docker does not run on the development and CI machines, so nothing here starts a container: the
compose file is validated against the Compose Specification schema (vendored in ``tests/data/``),
and the house rules of the "Operations files" section of the house style are checked one by one.
Where Debian's ``promtool``/``amtool`` are installed, they check the Prometheus and Alertmanager
configuration and the PromQL of every dashboard query too.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema.validators import validator_for

from agents.embedded import REDIS_LISTPACK_LIMITS

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
COMPOSE_SCHEMA = Path(__file__).resolve().parent / "data" / "compose-spec.json"
PROMETHEUS_DIR = ROOT / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
ALERTMANAGER_CONFIG = ROOT / "alertmanager" / "alertmanager.yml"
GRAFANA_DIR = ROOT / "grafana"
DASHBOARDS = sorted((GRAFANA_DIR / "dashboards").glob("*.json"))

DATASOURCE_UID = "kpi-prometheus"
DATASOURCE = {"type": "prometheus", "uid": DATASOURCE_UID}

# Metrics of the public contract (shared/contract.md, section 3) that live in the shared store:
# every worker exports the same value, so a query must deduplicate them across workers with max
# (or min), never sum or average them over instances.
STORE_METRICS = frozenset(
    {
        "kpi_page_views_total",
        "kpi_interactions_total",
        "kpi_participations_total",
        "kpi_shares_total",
        "kpi_visits_total",
        "kpi_bounced_visits_total",
        "kpi_visit_duration_seconds_total",
        "kpi_bounce_ratio",
        "kpi_interactions_per_visit",
        "kpi_participation_ratio",
        "kpi_average_visit_duration_seconds",
        "kpi_unique_visitors",
        "kpi_unique_participants",
        "kpi_events_processed_total",
        "kpi_events_rejected_total",
        "kpi_events_duplicate_total",
        "kpi_events_late_total",
        "kpi_watermark_timestamp_seconds",
        "kpi_open_visits",
    }
)
# Per-worker series (each worker reports its own), and Prometheus' own `up`.
PER_WORKER_METRICS = frozenset({"kpi_consumer_lag", "kpi_flush_duration_seconds_bucket", "up"})
ALLOWED_METRICS = STORE_METRICS | PER_WORKER_METRICS

# Defaults of the contract that the compose file restates as ${VAR:-default}.
CONTRACT_DEFAULTS = {
    "KPI_EVENTS_TOPIC": "kpi-events",
    "KPI_DLQ_TOPIC": "kpi-events-dlq",
    "KPI_EVENTS_PARTITIONS": "8",
    "KPI_SESSION_GAP_SECONDS": "1800",
    "KPI_IDLE_ADVANCE_SECONDS": "60",
    "KPI_ALLOWED_LATENESS_SECONDS": "600",
}
REQUIRED_SECRETS = {"KPI_IDENTITY_KEY", "GRAFANA_ADMIN_PASSWORD"}
SECRET_NAME = re.compile(r"(KEY|PASSWORD|SECRET|TOKEN)$")
# Compose interpolation: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, ...
IMAGE = re.compile(r"(?P<repo>[a-z0-9./_-]+):(?P<tag>[\w.-]+)(@sha256:[0-9a-f]{64})?")
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}")


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = load_yaml(COMPOSE_FILE)
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = compose["services"]
    return services


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): str(v) for k, v in env.items()}


def strings(node: Any) -> Iterator[str]:
    """Every string value of a parsed YAML document (keys excluded)."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)


def bind_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Host path -> container path of a service's short-syntax bind mounts."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts[source] = target
    return mounts


# --- docker-compose.yml ---------------------------------------------------------------------------


def compose_validator() -> Any:
    schema = json.loads(COMPOSE_SCHEMA.read_text(encoding="utf-8"))
    cls = validator_for(schema)  # the draft the schema declares in $schema
    cls.check_schema(schema)
    return cls(schema)


def test_compose_file_validates_against_the_compose_specification(compose: dict[str, Any]) -> None:
    errors = sorted(compose_validator().iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


@pytest.mark.parametrize(
    ("service", "key", "value"),
    [
        ("worker", "imagee", "typo"),  # unknown service key
        ("worker", "depends_on", {"kafka": {"condition": "healthy"}}),  # not a condition
        ("redis", "healthcheck", {"test": ["CMD", "true"], "interval": 10}),  # not a duration
    ],
)
def test_compose_schema_rejects_a_broken_file(
    compose: dict[str, Any], service: str, key: str, value: Any
) -> None:
    # The validation above means something only if the schema really rejects mistakes.
    broken = copy.deepcopy(compose)
    broken["services"][service][key] = value
    assert list(compose_validator().iter_errors(broken))


def test_every_image_is_pinned(services: dict[str, dict[str, Any]]) -> None:
    problems = []
    for name, service in services.items():
        image = service.get("image")
        if image is None:
            if "build" not in service:
                problems.append(f"{name}: neither image nor build")
            continue
        match = IMAGE.fullmatch(image)
        if match is None:
            problems.append(f"{name}: {image!r} has no tag")
        elif match["tag"] == "latest":
            problems.append(f"{name}: {image!r} uses latest")
        elif "build" not in service and not re.search(r"\d", match["tag"]):
            # A pulled image needs a version tag, not a moving one like `alpine` or `stable`.
            problems.append(f"{name}: {image!r} has no version in its tag")
    assert not problems, problems


def test_every_service_has_a_healthcheck_that_probes_it(
    services: dict[str, dict[str, Any]],
) -> None:
    problems = []
    for name, service in services.items():
        check = service.get("healthcheck") or {}
        test = check.get("test")
        if check.get("disable") or not test or test == ["NONE"]:
            problems.append(f"{name}: no healthcheck")
            continue
        command = " ".join(test[1:]) if isinstance(test, list) else test
        if isinstance(test, list) and test[0] not in ("CMD", "CMD-SHELL"):
            problems.append(f"{name}: healthcheck test must start with CMD or CMD-SHELL")
        if re.fullmatch(r"\s*(true|exit 0|:)\s*", command):
            problems.append(f"{name}: healthcheck {command!r} probes nothing")
    assert not problems, problems


def test_every_service_restarts_unless_stopped(services: dict[str, dict[str, Any]]) -> None:
    assert {
        n: s.get("restart") for n, s in services.items() if s.get("restart") != "unless-stopped"
    } == {}


def test_every_dependency_waits_for_a_healthy_service(
    services: dict[str, dict[str, Any]],
) -> None:
    problems = []
    for name, service in services.items():
        depends_on = service.get("depends_on", {})
        if isinstance(depends_on, list):
            problems.append(f"{name}: depends_on is a list (no condition)")
            continue
        for dependency, spec in depends_on.items():
            if dependency not in services:
                problems.append(f"{name}: depends on unknown service {dependency}")
            elif spec.get("condition") != "service_healthy":
                problems.append(f"{name} -> {dependency}: condition {spec.get('condition')!r}")
    assert not problems, problems
    assert services["worker"]["depends_on"].keys() >= {"kafka", "redis"}
    assert "prometheus" in services["grafana"]["depends_on"]


def test_interpolations_are_well_formed(compose: dict[str, Any]) -> None:
    for value in strings(compose):
        rest = INTERPOLATION.sub("", value).replace("$$", "")
        assert "$" not in rest, f"malformed or unbraced interpolation in {value!r}"


def test_required_secrets_fail_loudly_when_unset(services: dict[str, dict[str, Any]]) -> None:
    required = set()
    for name, service in services.items():
        for key, value in environment(service).items():
            match = INTERPOLATION.fullmatch(value)
            if match and match[2] in (":?", "?"):
                assert match[2] == ":?" and match[3], f"{name}.{key}: use ${{VAR:?message}}"
                required.add(match[1])
            elif SECRET_NAME.search(key):
                pytest.fail(
                    f"{name}.{key}: a secret must come from ${{VAR:?message}}, not {value!r}"
                )
    assert required >= REQUIRED_SECRETS


def test_worker_defaults_match_the_contract(services: dict[str, dict[str, Any]]) -> None:
    env = environment(services["worker"])
    defaults = {}
    for key, value in env.items():
        match = INTERPOLATION.fullmatch(value)
        if match and match[2] == ":-":
            assert match[1] == key, f"{key} defaults from another variable {match[1]}"
            defaults[key] = match[3]
    assert {k: defaults.get(k) for k in CONTRACT_DEFAULTS} == CONTRACT_DEFAULTS
    assert env["KPI_KAFKA_BOOTSTRAP"] == "kafka:9092"
    assert env["KPI_REDIS_URL"] == "redis://redis:6379/0"
    assert env["KPI_WEB_HOST"] == "0.0.0.0"


def test_compose_redis_has_the_embedded_listpack_limits(
    services: dict[str, dict[str, Any]],
) -> None:
    command = services["redis"]["command"]
    options = dict(zip(command[1::2], command[2::2], strict=False))
    assert {f"--{name}": value for name, value in REDIS_LISTPACK_LIMITS}.items() <= options.items()


def test_worker_is_replicated_without_a_host_port(services: dict[str, dict[str, Any]]) -> None:
    worker = services["worker"]
    port = environment(worker)["KPI_WEB_PORT"]
    assert worker["deploy"]["replicas"] >= 2
    assert "ports" not in worker, "replicas cannot share a fixed host port"
    assert port in [str(p) for p in worker["expose"]]
    assert f":{port}/metrics" in " ".join(worker["healthcheck"]["test"])


def test_kpi_environment_names_are_settings(services: dict[str, dict[str, Any]]) -> None:
    try:
        from agents.settings import Settings
    except ImportError as exc:  # the settings module is written by the lead, separately
        pytest.skip(f"agents.settings is not importable yet ({exc}); cannot check KPI_* names")
    fields = Settings.model_fields
    known = {f"KPI_{name.upper()}": field for name, field in fields.items()}
    dockerfile_env = re.findall(r"\b(KPI_[A-Z0-9_]+)=", (ROOT / "Dockerfile").read_text())
    used = {
        (name, key, value) for name, s in services.items() for key, value in environment(s).items()
    }
    unknown = sorted({key for _, key, _ in used if key.startswith("KPI_") and key not in known})
    unknown += sorted(set(dockerfile_env) - known.keys())
    assert not unknown, f"not a Settings field: {unknown}"
    # A default restated in compose must be the one the code has.
    for name, key, value in used:
        match = INTERPOLATION.fullmatch(value)
        if key in known and match and match[2] == ":-":
            default = known[key].default
            if isinstance(default, int | float | str):
                assert type(default)(match[3]) == default, f"{name}.{key}: {match[3]} != {default}"


def test_bind_mount_sources_exist(services: dict[str, dict[str, Any]]) -> None:
    missing = [
        f"{name}: {source}"
        for name, service in services.items()
        for source in bind_mounts(service)
        if not (ROOT / source).exists()
    ]
    assert not missing


# --- Dockerfile -----------------------------------------------------------------------------------


def test_dockerfile_is_pinned_non_root_and_runs_kpi() -> None:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, flags=re.M))
    bases = [
        re.sub(r"\$\{(\w+)\}", lambda m: args.get(m[1], m[0]), base)
        for base in re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    ]
    stages = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, flags=re.M | re.I))
    for base in bases:
        if base not in stages:
            assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", base), base
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"^RUN\s+pip install \.\s*$", text, flags=re.M)
    assert re.search(r'^ENTRYPOINT \["kpi"\]$', text, flags=re.M)
    assert re.search(r'^CMD \["worker"\]$', text, flags=re.M)


def test_the_entrypoint_is_the_projects_console_script() -> None:
    import tomllib

    pyproject = ROOT / "pyproject.toml"
    if not pyproject.exists():
        pytest.skip("no pyproject.toml yet")
    scripts = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"].get("scripts", {})
    assert "kpi" in scripts


# --- Prometheus and Alertmanager ------------------------------------------------------------------


def test_prometheus_config_points_at_existing_files_and_services(
    services: dict[str, dict[str, Any]],
) -> None:
    config = load_yaml(PROMETHEUS_CONFIG)
    assert config["global"]["scrape_interval"] == "5s"

    mounts = bind_mounts(services["prometheus"])
    assert mounts["./prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    assert config["rule_files"]
    for pattern in config["rule_files"]:
        # Relative to the config file, on both sides of the mount.
        folder = (PROMETHEUS_DIR / pattern).parent
        assert folder.is_dir(), pattern
        relative = folder.relative_to(ROOT).as_posix()
        assert mounts[f"./{relative}"] == f"/etc/prometheus/{folder.relative_to(PROMETHEUS_DIR)}"

    for manager in config["alerting"]["alertmanagers"]:
        for static in manager["static_configs"]:
            for target in static["targets"]:
                host, port = target.split(":")
                assert host in services, target
                assert f":{port}" in " ".join(services[host]["healthcheck"]["test"])

    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    (sd,) = jobs["kpi-worker"]["dns_sd_configs"]
    worker_port = int(environment(services["worker"])["KPI_WEB_PORT"])
    assert sd["names"] == ["worker"] and sd["type"] == "A" and sd["port"] == worker_port
    assert jobs["kpi-worker"].get("metrics_path", "/metrics") == "/metrics"


RULE_FILES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))


def test_rule_files_parse() -> None:
    # Passes on an empty folder too: the rule files are generated (`kpi alerts render`).
    for path in RULE_FILES:
        groups = load_yaml(path)["groups"]
        assert all(group["name"] and group["rules"] for group in groups), path


def test_alertmanager_routes_to_defined_receivers() -> None:
    config = load_yaml(ALERTMANAGER_CONFIG)
    receivers = {receiver["name"] for receiver in config["receivers"]}

    def routed(route: dict[str, Any]) -> Iterator[str]:
        if "receiver" in route:
            yield route["receiver"]
        for child in route.get("routes", []):
            yield from routed(child)

    assert set(routed(config["route"])) <= receivers
    assert config["route"]["receiver"] in receivers


@pytest.mark.prometheus
@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_the_prometheus_config() -> None:
    for args in (
        ["check", "config", str(PROMETHEUS_CONFIG)],
        ["check", "rules", *map(str, RULE_FILES)],
    ):
        if args[1] == "rules" and not RULE_FILES:
            continue
        result = subprocess.run(["promtool", *args], capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.prometheus
@pytest.mark.skipif(shutil.which("amtool") is None, reason="amtool is not installed")
def test_amtool_accepts_the_alertmanager_config() -> None:
    result = subprocess.run(
        ["amtool", "check-config", str(ALERTMANAGER_CONFIG)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- Grafana --------------------------------------------------------------------------------------


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])  # panels of a collapsed row


def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, expr) of every query of every dashboard."""
    exprs = []
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text(encoding="utf-8"))
        for panel in panels(dashboard):
            for target in panel.get("targets", []):
                exprs.append((f"{path.stem}/{panel['title']}/{target['refId']}", target["expr"]))
    return exprs


# PromQL words that are not metric names when they stand alone (not followed by a parenthesis).
PROMQL_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan"})
AGGREGATIONS = frozenset(
    {"sum", "avg", "min", "max", "count", "group", "stddev", "stdvar", "topk", "bottomk"}
    | {"quantile", "count_values", "limitk"}
)
STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')


def metric_names(expr: str) -> set[str]:
    """Metric names of a PromQL expression: identifiers that are neither calls nor label names."""
    s = STRING.sub('""', expr)  # label values and regexes
    s = re.sub(r"\{[^}]*\}", "", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", "", s)  # range selectors ($__rate_interval included)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", s)
    names = set()
    for match in re.finditer(r"(?<![\w:.$])([A-Za-z_:][\w:]*)\s*(\()?", s):
        if not match[2] and match[1].lower() not in PROMQL_KEYWORDS:
            names.add(match[1])
    return names


def undeduplicated(expr: str) -> list[str]:
    """Store-backed selectors of ``expr`` whose innermost enclosing aggregation is not max/min."""
    s = STRING.sub('""', expr)
    bad = []
    for match in re.finditer(r"(?<![\w:])(kpi_\w+)", s):
        if match[1] not in STORE_METRICS:
            continue
        depth, aggregation = 0, None
        for i in range(match.start() - 1, -1, -1):
            if s[i] == ")":
                depth += 1
            elif s[i] == "(" and depth:
                depth -= 1
            elif s[i] == "(":
                callee = re.search(r"([A-Za-z_]\w*)\s*(?:(?:by|without)\s*\([^()]*\)\s*)?$", s[:i])
                if callee and callee[1] in AGGREGATIONS:
                    aggregation = callee[1]
                    break
        if aggregation not in ("max", "min"):
            bad.append(f"{match[1]} under {aggregation}")
    return bad


@pytest.mark.parametrize(
    ("expr", "names", "ok"),
    [
        # a Grafana variable inside a regex matcher is not a metric
        ('max by (campaign) (kpi_bounce_ratio{campaign=~"$campaign"})', {"kpi_bounce_ratio"}, True),
        # rate over a range: the function is not a metric, the store counter is deduplicated by max
        ("max by (campaign) (rate(kpi_visits_total[1m]))", {"kpi_visits_total"}, True),
        # summing a store counter over workers counts it once per worker
        ("sum by (campaign) (rate(kpi_visits_total[1m]))", {"kpi_visits_total"}, False),
        # deduplicated first, then summed over partitions/campaigns: right
        ("sum(max without (instance) (kpi_open_visits))", {"kpi_open_visits"}, True),
        # a raw store series shows one duplicate line per worker
        ("kpi_open_visits", {"kpi_open_visits"}, False),
        (
            "time() - max(kpi_watermark_timestamp_seconds)",
            {"kpi_watermark_timestamp_seconds"},
            True,
        ),
        # per-worker histograms may be summed
        (
            "histogram_quantile(0.99, sum by (le) (rate(kpi_flush_duration_seconds_bucket[5m])))",
            {"kpi_flush_duration_seconds_bucket"},
            True,
        ),
        ('up{job="kpi-worker"} == bool 1', {"up"}, True),
    ],
)
def test_promql_helpers(expr: str, names: set[str], ok: bool) -> None:
    assert metric_names(expr) == names
    assert (not undeduplicated(expr)) is ok


def test_provisioned_datasource_has_the_fixed_uid() -> None:
    provisioning = GRAFANA_DIR / "provisioning" / "datasources"
    datasources = [
        ds for path in provisioning.glob("*.yaml") for ds in load_yaml(path)["datasources"]
    ]
    (prometheus,) = [ds for ds in datasources if ds["type"] == "prometheus"]
    assert prometheus["uid"] == DATASOURCE_UID
    assert prometheus["url"] == "http://prometheus:9090"
    assert prometheus["isDefault"] is True


def test_dashboard_provider_reads_the_mounted_dashboards(
    services: dict[str, dict[str, Any]],
) -> None:
    mounts = bind_mounts(services["grafana"])
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    provider_paths = [
        provider["options"]["path"]
        for path in (GRAFANA_DIR / "provisioning" / "dashboards").glob("*.yaml")
        for provider in load_yaml(path)["providers"]
        if provider["type"] == "file"
    ]
    assert provider_paths == [mounts["./grafana/dashboards"]]


def test_there_are_the_two_dashboards() -> None:
    assert [p.name for p in DASHBOARDS] == ["campaign-overview.json", "pipeline-health.json"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=[p.stem for p in DASHBOARDS])
def test_dashboard_panels_are_described_and_use_the_datasource(path: Path) -> None:
    dashboard = json.loads(path.read_text(encoding="utf-8"))
    assert dashboard["schemaVersion"] == 39
    assert dashboard["refresh"] == "10s"
    assert dashboard["uid"] and dashboard["title"]
    problems = []
    for panel in panels(dashboard):
        title = panel.get("title", "?")
        if not panel.get("description", "").strip():
            problems.append(f"{title}: no description")
        if panel.get("datasource") != DATASOURCE:
            problems.append(f"{title}: datasource {panel.get('datasource')}")
        if not panel.get("targets"):
            problems.append(f"{title}: no query")
        for target in panel.get("targets", []):
            if target.get("datasource", DATASOURCE) != DATASOURCE:
                problems.append(f"{title}/{target['refId']}: datasource {target['datasource']}")
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable["type"] == "query" and variable["datasource"] != DATASOURCE:
            problems.append(f"${variable['name']}: datasource {variable['datasource']}")
    assert not problems, problems


@pytest.mark.parametrize(
    ("where", "expr"), dashboard_exprs(), ids=[w for w, _ in dashboard_exprs()]
)
def test_dashboard_queries_use_contract_metrics_deduplicated(where: str, expr: str) -> None:
    names = metric_names(expr)
    assert names, f"{where}: no metric in {expr!r}"
    assert names <= ALLOWED_METRICS, f"{where}: unknown metrics {names - ALLOWED_METRICS}"
    assert not undeduplicated(expr), f"{where}: {undeduplicated(expr)} in {expr!r}"


def test_campaign_overview_variables() -> None:
    dashboard = json.loads((GRAFANA_DIR / "dashboards" / "campaign-overview.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    campaign, window = variables["campaign"], variables["window"]
    query = campaign["query"]["query"] if isinstance(campaign["query"], dict) else campaign["query"]
    assert query == "label_values(kpi_page_views_total, campaign)"
    assert campaign["multi"] and campaign["includeAll"]
    assert window["type"] == "custom" and window["query"] == "5m,1h,24h"
    assert window["current"]["value"] == "1h"
    # Every windowed gauge is filtered by the selected window.
    for where, expr in dashboard_exprs():
        windowed = re.search(
            r"kpi_(bounce_ratio|interactions_per_visit|participation_ratio"
            r"|average_visit_duration_seconds|unique_\w+)\{",
            expr,
        )
        if where.startswith("campaign-overview") and windowed:
            assert 'window="$window"' in expr, where


@pytest.mark.prometheus
@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    # Each query becomes a recording rule, so `promtool check rules` parses its PromQL.
    variables = {"$campaign": ".*", "$window": "1h", "$__rate_interval": "1m", "$__interval": "5s"}
    rules = []
    for i, (_, expr) in enumerate(dashboard_exprs()):
        for variable, value in variables.items():
            expr = expr.replace(variable, value)
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    rule_file = tmp_path / "dashboards.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run(
        ["promtool", "check", "rules", str(rule_file)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
