"""The Kubernetes manifests and image of ``sluice.deploy`` (core/deploy/),
checked offline: against the Kubernetes schemas (kubernetes-validate's
bundled ones, no cluster), with ``sluice check`` on the configs they embed,
and for the promises that tie them together (probes on the metrics address,
a grace period that covers preStop and the drain, selectors that match, an
image that runs the mounted config). The probes themselves are run, as the
kubelet runs an httpGet probe, against a real ``sluice run``.

``kubectl apply --dry-run=client`` is not used: it asks an API server for
the schema and the resource types, so offline it fails (even with
--validate=false); ``kubectl kustomize``, offline, checks that Kubernetes'
own YAML parser reads the files as PyYAML does.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import tomllib

import dockerfile
import httpx
import kubernetes_validate
import pytest
import trio
import yaml

from sluice import deploy

from .proc import ROOT, Running, ThreadOrigin, free_port, poll, sluice
from .test_discovery_dns import DnsServer

K8S_VERSION = "1.32.0"  # the oldest schema kubernetes-validate bundles; native sidecars and preStop sleep need >= 1.30

MANIFESTS = deploy.manifests()
DOCS = [(p.name, i, doc) for p in MANIFESTS for i, doc in enumerate(yaml.safe_load_all(p.read_text())) if doc]
BY_KIND: dict[str, list[dict]] = {}
for _name, _i, _doc in DOCS:
    BY_KIND.setdefault(_doc["kind"], []).append(_doc)


def _configmap(name: str) -> dict:
    return next(d for d in BY_KIND["ConfigMap"] if d["metadata"]["name"] == name)


def _pod_specs() -> list[tuple[str, dict]]:
    return [(d["metadata"]["name"], d["spec"]["template"]["spec"]) for d in BY_KIND["Deployment"]]


def _sluice_containers() -> list[tuple[str, dict, dict]]:
    """(deployment, pod spec, container) for every container running the sluice image."""
    out = []
    for name, spec in _pod_specs():
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            if c["image"].startswith("sluice:"):
                out.append((name, spec, c))
    return out


def _mounted_config(spec: dict, container: dict) -> tuple[str, dict]:
    """The path the container sees its sluice.toml at, and the config parsed."""
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/etc/sluice")
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    cm = _configmap(volume["configMap"]["name"])
    return f"{mount['mountPath']}/sluice.toml", tomllib.loads(cm["data"]["sluice.toml"])


def _probe_url(probe: dict, container: dict) -> str:
    """Where the kubelet sends an httpGet probe (``POD`` for the pod's IP), its named port resolved."""
    get = probe["httpGet"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    port = ports[get["port"]] if isinstance(get["port"], str) else get["port"]
    return f"{get.get('scheme', 'HTTP').lower()}://POD:{port}{get['path']}"


def test_the_package_ships_every_file():
    shipped = deploy.files()
    assert {"Dockerfile", "README.md", "k8s/gateway-deployment.yaml", "k8s/sidecar.yaml"} <= set(shipped)
    assert all(p.is_file() for p in shipped.values())
    kinds = {d["kind"] for _n, _i, d in DOCS}
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "HorizontalPodAutoscaler"} <= kinds


@pytest.mark.parametrize("doc", [d for _n, _i, d in DOCS], ids=[f"{n}[{i}]" for n, i, _d in DOCS])
def test_every_manifest_validates_against_the_schema(doc):
    assert kubernetes_validate.validate(doc, K8S_VERSION, strict=True) == "1.32"


@pytest.mark.parametrize("breakage", ["typo", "type", "missing"])
def test_a_broken_manifest_fails_validation(breakage):
    doc = copy.deepcopy(BY_KIND["Deployment"][0])
    container = doc["spec"]["template"]["spec"]["containers"][0]
    if breakage == "typo":
        doc["spec"]["replica"] = 3  # strict: an unknown key
    elif breakage == "type":
        container["ports"][0]["containerPort"] = "eighty"
    else:
        del container["name"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("name", [d["metadata"]["name"] for d in BY_KIND["ConfigMap"]])
def test_embedded_configs_pass_sluice_check(name, tmp_path):
    path = tmp_path / "sluice.toml"
    path.write_text(_configmap(name)["data"]["sluice.toml"])
    result = sluice("check", str(path))
    assert result.returncode == 0, result.stderr
    # and the check does look: the same file with one bad key fails, naming it
    path.write_text(path.read_text().replace("drain_timeout = ", "drain_timout = ", 1))
    result = sluice("check", str(path))
    assert result.returncode == 2 and "server.drain_timout" in result.stderr


def test_probes_and_scrapes_reach_the_metrics_address_of_the_mounted_config():
    """The kubelet and Prometheus come from outside the pod, to its IP: the
    read-only metrics listener binds every address, the admin stays on loopback."""
    assert _sluice_containers()
    for deployment, spec, container in _sluice_containers():
        _path, config = _mounted_config(spec, container)
        assert config["admin"]["address"].startswith("127.0.0.1:"), "the admin stays on loopback"
        host, port = config["metrics"]["address"].rsplit(":", 1)
        assert host == "0.0.0.0", deployment
        assert {"name": "metrics", "containerPort": int(port), "protocol": "TCP"} in container["ports"]
        expected = {"startupProbe": "/live", "livenessProbe": "/live", "readinessProbe": "/ready"}
        for kind, path in expected.items():
            assert _probe_url(container[kind], container) == f"http://POD:{port}{path}", (deployment, kind)
        template = next(d for d in BY_KIND["Deployment"] if d["metadata"]["name"] == deployment)["spec"]["template"]
        assert template["metadata"]["annotations"] == {"prometheus.io/scrape": "true", "prometheus.io/port": port,
                                                       "prometheus.io/path": "/metrics"}, deployment


def test_the_startup_probe_waits_for_the_first_discovery_snapshot():
    """The metrics listener (as the admin) starts after every discovery cluster's first snapshot, or
    its initial_timeout: the startup probe must give it that long (and more)."""
    for deployment, spec, container in _sluice_containers():
        _path, config = _mounted_config(spec, container)
        waits = [c["discovery"].get("initial_timeout", 5.0) for c in config["clusters"].values() if "discovery" in c]
        probe = container["startupProbe"]
        budget = probe["periodSeconds"] * probe["failureThreshold"]
        assert budget >= max(waits, default=0) + 10, (deployment, budget, waits)


def test_the_grace_period_covers_prestop_and_the_drain():
    for deployment, spec, container in _sluice_containers():
        _path, config = _mounted_config(spec, container)
        drain = config["server"]["drain_timeout"]
        # every preStop in the pod runs before the containers' SIGTERMs (a native sidecar's after the app's)
        pre_stop = sum(c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
                       for c in [*spec.get("initContainers", []), *spec["containers"]])
        assert pre_stop > 0, deployment
        assert spec["terminationGracePeriodSeconds"] > pre_stop + drain, deployment


def _selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def test_selectors_match_the_deployments_labels():
    deployments = {d["metadata"]["name"]: d for d in BY_KIND["Deployment"]}
    for d in deployments.values():
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert _selects(d["spec"]["selector"]["matchLabels"], labels)
        for spread in d["spec"]["template"]["spec"].get("topologySpreadConstraints", []):
            assert _selects(spread["labelSelector"]["matchLabels"], labels)
    gateway = deployments["sluice-gateway"]["spec"]["template"]["metadata"]["labels"]
    (pdb,) = BY_KIND["PodDisruptionBudget"]
    assert _selects(pdb["spec"]["selector"]["matchLabels"], gateway)
    (hpa,) = BY_KIND["HorizontalPodAutoscaler"]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "sluice-gateway")
    assert hpa["spec"]["minReplicas"] >= 2 and deployments["sluice-gateway"]["spec"]["replicas"] >= 2
    # every Service that fronts a Deployment here selects its pods, on a port a sluice container names
    for svc in BY_KIND["Service"]:
        fronted = [d for d in deployments.values()
                   if _selects(svc["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])]
        if svc["spec"].get("clusterIP") == "None":
            continue  # the headless upstream: its pods are the user's
        assert len(fronted) == 1, svc["metadata"]["name"]
        spec = fronted[0]["spec"]["template"]["spec"]
        names = {p["name"] for c in [*spec.get("initContainers", []), *spec["containers"]] for p in c.get("ports", [])}
        assert all(p["targetPort"] in names for p in svc["spec"]["ports"])


def test_the_headless_upstream_is_the_name_the_gateway_resolves():
    (headless,) = [s for s in BY_KIND["Service"] if s["spec"].get("clusterIP") == "None"]
    config = tomllib.loads(_configmap("sluice-gateway")["data"]["sluice.toml"])
    discovery = config["clusters"]["backend"]["discovery"]
    assert discovery["source"] == "dns"
    assert discovery["name"].startswith(f"{headless['metadata']['name']}.")
    assert discovery["name"].endswith(".svc.cluster.local")  # a full name: the dns source uses no search list
    assert discovery["port"] == headless["spec"]["ports"][0]["port"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_reads_the_manifests_as_the_schema_check_does(tmp_path):
    """``kubectl kustomize`` parses with Kubernetes' own (Go) YAML stack, offline: it
    must read every manifest (flow mappings and block scalars included) into
    the same objects that PyYAML gave the schema check."""
    for path in MANIFESTS:
        shutil.copy(path, tmp_path)
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({"resources": [p.name for p in MANIFESTS]}))
    built = subprocess.run(["kubectl", "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    by_name = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(built.stdout)}
    assert by_name == {(d["kind"], d["metadata"]["name"]): d for _n, _i, d in DOCS}


def test_the_image_runs_the_mounted_config_as_its_user():
    # parsed by BuildKit's own parser (the dockerfile package): what docker build reads
    instructions = dockerfile.parse_file(str(deploy.files()["Dockerfile"]))
    (entry,) = [i for i in instructions if i.cmd == "ENTRYPOINT"]
    assert entry.json and entry.value[:3] == ("sluice", "run", "-c")  # exec form: SIGTERM reaches sluice
    (user,) = [i.value[0] for i in instructions if i.cmd == "USER"]
    for deployment, spec, container in _sluice_containers():
        path, _config = _mounted_config(spec, container)
        assert entry.value[3] == path, deployment
        assert "command" not in container and "args" not in container  # the image's entry point runs
        assert user == f"{spec['securityContext']['runAsUser']}:{spec['securityContext']['runAsGroup']}"
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"])  # the metrics' files
    # the build copies what building the wheel needs from the repository root (the
    # context), and the ignore file beside the Dockerfile lets exactly that through
    copied = {src for i in instructions if i.cmd == "COPY" and not i.flags for src in i.value[:-1]}
    assert copied == {"pyproject.toml", "README.md", "core/", "plugins/"}
    ignore = deploy.files()["Dockerfile.dockerignore"].read_text().splitlines()
    assert "*" in ignore and {line[1:] for line in ignore if line.startswith("!")} == copied


def _probe(probe: dict, address: str) -> int:
    """A manifest's httpGet probe sent here as the kubelet sends it, to ``address``
    (the metrics listener's, for the pod's IP and port): 0 when it passes (a status
    in 200-399 within timeoutSeconds), else 1."""
    try:
        answer = httpx.get(f"http://{address}{probe['httpGet']['path']}", timeout=probe["timeoutSeconds"],
                           follow_redirects=False)
    except httpx.TransportError:
        return 1
    return 0 if 200 <= answer.status_code < 400 else 1


def test_the_probes_follow_a_real_sluice_through_its_drain(tmp_path):
    (_deployment, _spec, container) = next(x for x in _sluice_containers() if x[0] == "sluice-gateway")
    admin, metrics = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    assert _probe(container["livenessProbe"], metrics) == 1  # nothing listens: a failure, not a hang
    with ThreadOrigin(delay=3.0) as origin:
        config = tmp_path / "sluice.toml"
        config.write_text(
            f'[server]\ndrain_timeout = 10\n[admin]\nenabled = true\naddress = "{admin}"\n'
            f'[metrics]\naddress = "{metrics}"\n'
            f'[[listeners]]\naddress = "127.0.0.1:0"\nfilters = ["router"]\n'
            f'[clusters.app]\nendpoints = ["{origin.address}"]\n'
            f'[[routes]]\nmatch = {{ prefix = "/" }}\ncluster = "app"\n')
        with Running("-c", str(config)) as proxy:
            for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                assert _probe(container[kind], metrics) == 0, kind
            answers: list[int] = []
            slow = threading.Thread(target=lambda: answers.append(httpx.get(f"{proxy.url}/slow", timeout=10).status_code))
            slow.start()
            poll(lambda: _in_flight(admin), what="a request in flight", proxy=proxy)
            proxy.signal(signal.SIGTERM)
            # draining: not ready (the Service stops sending), still live (no restart mid-drain)
            poll(lambda: _probe(container["readinessProbe"], metrics) == 1, what="/ready fails while draining",
                 proxy=proxy)
            assert _probe(container["livenessProbe"], metrics) == 0
            slow.join(10)
            assert answers == [200]  # the request in flight finished
            assert proxy.wait() == 0


def _in_flight(admin: str) -> bool:
    (endpoint,) = httpx.get(f"http://{admin}/clusters").json()["clusters"]["app"]["endpoints"]
    return endpoint["active_requests"] > 0


def _config_here(configmap: str, changes: list[tuple[str, str]]) -> str:
    """A ConfigMap's sluice.toml with only what differs outside a pod changed (ports,
    and a nameserver: CoreDNS's part); each text to change must be there once."""
    text = _configmap(configmap)["data"]["sluice.toml"]
    for old, new in changes:
        assert text.count(old) == 1, old  # the ConfigMap changed: change this test with it
        text = text.replace(old, new)
    return text


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


async def test_the_gateway_config_serves_the_pods_its_headless_service_names(nursery, tmp_path):
    """The gateway's own config, run: its cluster follows the headless Service's
    name (here a real DNS server standing in for CoreDNS), and the probes pass."""
    (_deployment, _spec, container) = next(x for x in _sluice_containers() if x[0] == "sluice-gateway")
    name = tomllib.loads(_configmap("sluice-gateway")["data"]["sluice.toml"])["clusters"]["backend"]["discovery"]["name"]
    dns_server = DnsServer(nursery)
    await dns_server.start()
    dns_server.set(name, "A", ["127.0.0.1"], ttl=1)  # one ready backend pod
    admin, metrics = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    with ThreadOrigin(body=b"from the backend") as origin:
        config = tmp_path / "sluice.toml"
        config.write_text(_config_here("sluice-gateway", [
            ('"0.0.0.0:8080"', '"127.0.0.1:0"'), ('"127.0.0.1:9901"', f'"{admin}"'),
            ('"0.0.0.0:9102"', f'"{metrics}"'),
            ("port = 8080,", f"port = {_port(origin.address)},"),
            ('type = "A",', f'type = "A", nameserver = "{dns_server.address}",')]))
        proxy = await trio.to_thread.run_sync(Running, "-c", str(config))
        try:
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert await trio.to_thread.run_sync(_probe, container[kind], metrics) == 0, kind
            answer = await trio.to_thread.run_sync(httpx.get, f"{proxy.url}/orders")
            assert (answer.status_code, answer.content) == (200, b"from the backend")
            assert origin.served == ["/orders"]
            # the pod leaves the Service (NXDOMAIN, as for a Service with no ready pod): within the TTL
            # the cluster is empty, and sluice answers 503 rather than send to it
            del dns_server.records[(name, "A")]

            def gone() -> bool:
                return httpx.get(f"{proxy.url}/orders").status_code == 503

            await trio.to_thread.run_sync(lambda: poll(gone, timeout=10, what="the backend gone", proxy=proxy))
            healthz = await trio.to_thread.run_sync(httpx.get, f"{proxy.url}/healthz")
            assert (healthz.status_code, healthz.text) == (200, "ok\n")
        finally:
            await trio.to_thread.run_sync(proxy.stop)


async def test_the_sidecar_config_fronts_the_app_and_carries_its_calls(nursery, tmp_path):
    """The sidecar's own config, run: inbound requests reach the app on its loopback
    port; the app's calls to 127.0.0.1:15001 and :15002 reach payments and inventory,
    found by their headless Services' names."""
    (_deployment, _spec, container) = next(x for x in _sluice_containers() if x[0] == "shop")
    clusters = tomllib.loads(_configmap("shop-sluice")["data"]["sluice.toml"])["clusters"]
    dns_server = DnsServer(nursery)
    await dns_server.start()
    admin, metrics, inbound, out_payments, out_inventory = (free_port() for _ in range(5))
    with (ThreadOrigin(body=b"app") as app, ThreadOrigin(body=b"payments") as payments,
          ThreadOrigin(body=b"inventory") as inventory):
        changes = [('"0.0.0.0:8080"', f'"127.0.0.1:{inbound}"'), ("{ port = 8080,", f"{{ port = {inbound},"),
                   ('"127.0.0.1:15001"', f'"127.0.0.1:{out_payments}"'), ("{ port = 15001,", f"{{ port = {out_payments},"),
                   ('"127.0.0.1:15002"', f'"127.0.0.1:{out_inventory}"'),
                   ("{ port = 15002,", f"{{ port = {out_inventory},"),
                   ('"127.0.0.1:8081"', f'"{app.address}"'), ('"127.0.0.1:9901"', f'"127.0.0.1:{admin}"'),
                   ('"0.0.0.0:9102"', f'"127.0.0.1:{metrics}"')]
        for cluster, origin in (("payments", payments), ("inventory", inventory)):
            name = clusters[cluster]["discovery"]["name"]
            dns_server.set(name, "A", ["127.0.0.1"], ttl=5)
            changes.append((f'name = "{name}", type = "A", port = 8080,',
                            f'name = "{name}", type = "A", port = {_port(origin.address)}, '
                            f'nameserver = "{dns_server.address}",'))
        config = tmp_path / "sluice.toml"
        config.write_text(_config_here("shop-sluice", changes))
        proxy = await trio.to_thread.run_sync(Running, "-c", str(config))
        try:
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert await trio.to_thread.run_sync(_probe, container[kind], f"127.0.0.1:{metrics}") == 0, kind
            for port, body in ((inbound, b"app"), (out_payments, b"payments"), (out_inventory, b"inventory")):
                answer = await trio.to_thread.run_sync(httpx.get, f"http://127.0.0.1:{port}/x")
                assert (answer.status_code, answer.content) == (200, body), port
            assert app.served == payments.served == inventory.served == ["/x"]
        finally:
            await trio.to_thread.run_sync(proxy.stop)


# $1: the config; $2: the checkout (its venv runs sluice). A checkout under /tmp (a CI
# clone) would vanish under the fresh /tmp, so it is carried over by a bind mount.
_READ_ONLY_ROOT = """set -e
mount --make-rprivate /
mount -t tmpfs -o size=1m tmpfs /srv          # the ConfigMap's volume, read-only
cp "$1" /srv/sluice.toml
mkdir /srv/checkout
mount --bind "$2" /srv/checkout
mount -o remount,ro /srv
mount -o remount,bind,ro /                    # readOnlyRootFilesystem
mount -t tmpfs -o size=64m tmpfs /tmp         # the emptyDir at /tmp
case "$2" in /tmp/*) mkdir -p "$2" && mount --bind /srv/checkout "$2" ;; esac
cd /
shift 2
exec "$@"
"""


def _can_unshare() -> str | None:
    if shutil.which("unshare") is None:
        return "unshare is not installed"
    done = subprocess.run(["unshare", "-m", "sh", "-c", "mount --make-rprivate / && mount -o remount,bind,ro /"],
                          capture_output=True, text=True, timeout=10)
    return None if done.returncode == 0 else f"no mount namespace here: {done.stderr.strip()}"


async def test_sluice_runs_on_a_read_only_root_with_only_tmp_writable(nursery, tmp_path):
    """readOnlyRootFilesystem holds: the gateway's config runs, serves, answers its
    probes and drains in a mount namespace whose root is read-only, with a fresh
    /tmp (the emptyDir) and the config on a read-only volume, as in the pod."""
    if reason := _can_unshare():
        pytest.skip(reason)
    (_deployment, _spec, container) = next(x for x in _sluice_containers() if x[0] == "sluice-gateway")
    name = tomllib.loads(_configmap("sluice-gateway")["data"]["sluice.toml"])["clusters"]["backend"]["discovery"]["name"]
    dns_server = DnsServer(nursery)
    await dns_server.start()
    dns_server.set(name, "A", ["127.0.0.1"], ttl=5)
    admin, metrics, public = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}", free_port()
    env = {**os.environ, **{e["name"]: e["value"] for e in container["env"]}}
    with ThreadOrigin(body=b"from the backend") as origin:
        config = tmp_path / "sluice.toml"
        config.write_text(_config_here("sluice-gateway", [
            ('"0.0.0.0:8080"', f'"127.0.0.1:{public}"'), ('"127.0.0.1:9901"', f'"{admin}"'),
            ('"0.0.0.0:9102"', f'"{metrics}"'),
            ("port = 8080,", f"port = {_port(origin.address)},"),
            ('type = "A",', f'type = "A", nameserver = "{dns_server.address}",')]))
        log = (tmp_path / "stderr").open("w+")
        proc = subprocess.Popen(["unshare", "-m", "sh", "-c", _READ_ONLY_ROOT, "sh", str(config), str(ROOT),
                                 sys.executable, "-m", "sluice", "run", "-c", "/srv/sluice.toml"],
                                stdout=subprocess.DEVNULL, stderr=log, env=env)
        try:
            def ready() -> bool:
                assert proc.poll() is None, (tmp_path / "stderr").read_text()
                return _probe(container["readinessProbe"], metrics) == 0

            await trio.to_thread.run_sync(lambda: poll(ready, timeout=20, what="/ready"))
            assert await trio.to_thread.run_sync(_probe, container["livenessProbe"], metrics) == 0
            answer = await trio.to_thread.run_sync(httpx.get, f"http://127.0.0.1:{public}/orders")
            assert (answer.status_code, answer.content) == (200, b"from the backend")
            scraped = await trio.to_thread.run_sync(httpx.get, f"http://{metrics}/metrics")
            assert "sluice_downstream_requests_total" in scraped.text  # its multiprocess files: in /tmp
            proc.send_signal(signal.SIGTERM)
            assert await trio.to_thread.run_sync(lambda: proc.wait(20)) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    stderr = (tmp_path / "stderr").read_text()
    assert "Read-only file system" not in stderr and "Traceback" not in stderr, stderr


def _fleet_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("### Running a fleet\n")
    return text[start:text.index("\n## ", start)]


def test_running_a_fleet_links_to_what_exists():
    text = (ROOT / "README.md").read_text()
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    anchors = {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in re.findall(r"^#+ (.+)$", prose, re.M)}
    section = _fleet_section()
    links = re.findall(r"\]\(#([^)]+)\)", section)
    assert {"service-discovery", "self-registration", "config-centre", "rate-limiting"} <= set(links)
    assert set(links) <= anchors, set(links) - anchors
    for path in re.findall(r"\]\(([\w/.-]+)\)", section):
        assert (ROOT / path).exists(), path


def test_running_a_fleet_config_passes_sluice_check(tmp_path):
    (block,) = re.findall(r"^```toml\n(.*?)^```", _fleet_section(), re.M | re.S)
    config = tmp_path / "fleet.toml"
    config.write_text('[[listeners]]\nname = "public"\naddress = "127.0.0.1:0"\nfilters = ["rate_limit", "router"]\n'
                      '[[routes]]\nmatch = { prefix = "/" }\ncluster = "api"\n' + block)
    result = sluice("check", "--file-only", str(config))  # the snippet's etcd is not here
    assert result.returncode == 0, result.stderr
    assert "ok (http1 codec" in result.stdout  # the file alone, as asked
    unreachable = sluice("check", str(config))  # without --file-only, the store is read, as a start would
    assert unreachable.returncode == 2 and "config_store" in unreachable.stderr, unreachable.stderr
