"""Tests of the deployment files (docker/, deploy/) that need no container engine: the
Kubernetes overlays rendered by kustomize and checked object by object, Prometheus'
configuration and rules through promtool, the Dockerfiles and compose file read against
the repository (one package list, pinned images, targets that exist), and every query of
every Grafana dashboard evaluated against a real Prometheus that has scraped a real
coordinator running a short experiment. Run by ctest (deploy_integration)."""

import glob
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
import unittest

import yaml

import harness
from harness import Cluster, ROOT, wait_for

DOCKER = os.path.join(ROOT, "docker")
DEPLOY = os.path.join(ROOT, "deploy")
DASHBOARDS = os.path.join(DEPLOY, "grafana", "dashboards")
RULES = os.path.join(DEPLOY, "prometheus", "rules")
OVERLAYS = os.path.join(DEPLOY, "k8s", "overlays")


def read(path):
    with open(path) as f:
        return f.read()


def package_list():
    """scripts/packages.txt as scripts/setup.sh reads it: '#' starts a comment."""
    names = []
    for line in read(os.path.join(ROOT, "scripts", "packages.txt")).splitlines():
        names += line.split("#", 1)[0].split()
    return names


def dashboards():
    return {os.path.basename(p): json.loads(read(p)) for p in sorted(glob.glob(os.path.join(DASHBOARDS, "*.json")))}


def all_panels(panels):
    """Panels, with those inside collapsed rows."""
    for p in panels:
        yield p
        yield from all_panels(p.get("panels", []))


# --- Dockerfiles --------------------------------------------------------------------------


class Dockerfile:
    """A Dockerfile read into stages: each stage's base image (ARG defaults substituted),
    name and instructions (continuation lines joined)."""

    def __init__(self, path):
        self.path = path
        text = re.sub(r"\\\n", " ", read(path))
        self.args, self.stages = {}, []
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            op, _, rest = line.partition(" ")
            op = op.upper()
            if op == "ARG" and not self.stages:
                name, _, default = rest.strip().partition("=")
                self.args[name] = default
            elif op == "FROM":
                words = rest.split()
                image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: self.args[m.group(1) or m.group(2)], words[0])
                name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
                self.stages.append({"image": image, "name": name, "ops": []})
            else:
                self.stages[-1]["ops"].append((op, rest.strip()))

    def stage(self, name):
        for s in self.stages:
            if s["name"] == name:
                return s
        raise KeyError(f"{self.path}: no stage {name}")

    def final_stage_chain(self, name):
        """The ops of stage `name` and of the stages it is built FROM, base first."""
        s = self.stage(name)
        names = {x["name"] for x in self.stages}
        chain = [s]
        while s["image"] in names:
            s = self.stage(s["image"])
            chain.insert(0, s)
        return [op for st in chain for op in st["ops"]]


def dockerfiles():
    return {os.path.basename(p): Dockerfile(p) for p in sorted(glob.glob(os.path.join(DOCKER, "Dockerfile*")))
            if not p.endswith(".dockerignore")}


def cmake_targets():
    """Every add_executable() target of the repository's CMakeLists.txt files."""
    targets = set()
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = [d for d in subfolders if not d.startswith(("build", ".", "runs"))]
        if "CMakeLists.txt" in files:
            targets |= set(re.findall(r"add_executable\(\s*([\w-]+)", read(os.path.join(folder, "CMakeLists.txt"))))
    return targets


def pinned(image):
    """An image reference with an explicit tag other than latest (or a digest)."""
    if "@sha256:" in image:
        return True
    last = image.rsplit("/", 1)[-1]
    return ":" in last and last.split(":", 1)[1] not in ("", "latest")


class DockerTest(unittest.TestCase):
    def test_images_install_the_one_package_list_of_setup_sh(self):
        packages = package_list()
        self.assertIn("libgrpc++-dev", packages)
        # setup.sh installs exactly what packages.txt lists, nothing else by name.
        setup = read(os.path.join(ROOT, "scripts", "setup.sh"))
        self.assertIn('"$here/packages.txt"', setup)
        self.assertRegex(setup, r'apt-get install [^\n]*"\$\{missing\[@\]\}"')
        for name, df in dockerfiles().items():
            with self.subTest(dockerfile=name):
                build = df.stage("build")
                ops = build["ops"]
                copies = [rest for op, rest in ops if op == "COPY"]
                runs = [rest for op, rest in ops if op == "RUN"]
                self.assertTrue(any("scripts/packages.txt" in c and "scripts/setup.sh" in c for c in copies),
                                f"{name}: the build stage must COPY scripts/packages.txt and scripts/setup.sh")
                self.assertTrue(any(re.search(r"\bbash scripts/setup\.sh\b", r) for r in runs),
                                f"{name}: the build stage must RUN scripts/setup.sh")
                # setup.sh runs before the sources are copied in (so the layer is cached)...
                first_setup = next(i for i, (op, rest) in enumerate(ops) if op == "RUN" and "setup.sh" in rest)
                first_all = next(i for i, (op, rest) in enumerate(ops) if op == "COPY" and rest.startswith(". "))
                self.assertLess(first_setup, first_all)
                # ...and no stage names packages of its own: runtime stages install only the
                # list that docker/runtime-packages.sh derives from the build.
                for stage in df.stages:
                    for op, rest in stage["ops"]:
                        if op == "RUN" and "apt-get install" in rest:
                            self.assertRegex(rest, r"xargs -a /tmp/runtime-packages\.txt apt-get install",
                                             f"{name} stage {stage['name']}: installs packages by name")

    def test_runtime_packages_follow_from_the_built_binaries(self):
        binaries = [harness.binary(b) for b in ("sinkscope-coordinator", "sinkscope-worker", "sinkscope",
                                                "sinkscope-health")]
        r = subprocess.run(["bash", os.path.join(DOCKER, "runtime-packages.sh"), *binaries], capture_output=True,
                           text=True, timeout=120)
        self.assertEqual(r.returncode, 0, r.stderr)
        runtime = r.stdout.split()
        for lib in ("libc6", "libstdc++6", "libgomp1", "libsqlite3-0", "libyaml-cpp0.7", "libopenblas0-openmp"):
            self.assertIn(lib, runtime)
        self.assertTrue(any(p.startswith("libgrpc++") for p in runtime), runtime)
        self.assertTrue(any(p.startswith("libprotobuf") for p in runtime), runtime)
        # Runtime libraries only: none of the -dev packages, compilers or tools of the list.
        self.assertFalse(set(runtime) & set(package_list()), runtime)

    def test_dockerfiles_are_consistent_with_the_repository(self):
        targets = cmake_targets()
        dfs = dockerfiles()
        self.assertEqual(set(dfs), {"Dockerfile", "Dockerfile.cuda"})
        finals = {"Dockerfile": ["coordinator", "worker-cpu"], "Dockerfile.cuda": ["worker-cuda"]}
        for name, df in dfs.items():
            out_bin = set()  # what the build stage puts in /out/bin
            for stage in df.stages:
                with self.subTest(dockerfile=name, stage=stage["name"]):
                    names = {s["name"] for s in df.stages}
                    self.assertTrue(stage["image"] in names or pinned(stage["image"]),
                                    f"{name}: FROM {stage['image']} is not pinned by tag")
                    for op, rest in stage["ops"]:
                        if op != "COPY":
                            continue
                        words = shlex.split(rest)
                        from_stage = next((w.split("=", 1)[1] for w in words if w.startswith("--from=")), None)
                        sources = [w for w in words if not w.startswith("--")][:-1]
                        if from_stage:
                            self.assertIn(from_stage, names)
                        else:
                            for src in sources:
                                self.assertTrue(os.path.exists(os.path.join(ROOT, src)), f"{name}: COPY {src}")
                    built = []
                    for op, rest in stage["ops"]:
                        if op == "RUN" and "--target" in rest:
                            built += rest.split("--target", 1)[1].split()
                            for t in built:
                                self.assertIn(t, targets, f"{name}: --target {t} is no CMake target")
                        if op == "RUN" and "/out/bin" in rest:
                            for path in re.findall(r"build/(?:server|worker|client|tools)/([\w-]+)", rest):
                                self.assertIn(path, built, f"{name}: copies {path}, which it does not build")
                                out_bin.add(path)
            for stage in df.stages:
                for op, rest in stage["ops"]:
                    for binary in re.findall(r"/out/bin/([\w-]+)", rest) if op == "COPY" else []:
                        self.assertIn(binary, out_bin, f"{name}: COPY /out/bin/{binary}, which is not built")
            self.assertTrue(os.path.exists(os.path.join(DOCKER, name + ".dockerignore")))
            for final in finals[name]:
                with self.subTest(dockerfile=name, image=final):
                    ops = df.final_stage_chain(final)
                    users = [rest for op, rest in ops if op == "USER"]
                    self.assertTrue(users, f"{final}: no USER")
                    self.assertNotIn(users[-1].split(":")[0], ("0", "root"))
                    health = [rest for op, rest in ops if op == "HEALTHCHECK"]
                    self.assertTrue(health and "sinkscope-health" in health[-1], f"{final}: no gRPC HEALTHCHECK")
                    self.assertTrue(any(op == "ENTRYPOINT" for op, _ in ops))
        cuda = dfs["Dockerfile.cuda"]
        self.assertRegex(cuda.stage("build")["image"], r"^nvidia/cuda:13\.[\d.]+-cudnn-devel-")
        self.assertRegex(cuda.stage("worker-cuda")["image"], r"^nvidia/cuda:13\.[\d.]+-cudnn-runtime-")
        self.assertIn("-DSINKSCOPE_CUDA=ON", " ".join(r for op, r in cuda.stage("build")["ops"] if op == "RUN"))
        debian = dfs["Dockerfile"].stage("build")["image"]
        self.assertRegex(debian, r"^debian:(12[\d.]*|bookworm[\w-]*)(-slim)?$")
        self.assertIn("-DSINKSCOPE_CUDA=OFF", " ".join(r for op, r in dfs["Dockerfile"].stage("build")["ops"]
                                                       if op == "RUN"))

    def test_compose_stack_fits_together(self):
        compose = yaml.safe_load(read(os.path.join(DOCKER, "compose.yaml")))
        services = compose["services"]
        self.assertEqual(set(services), {"coordinator", "worker", "prometheus", "grafana"})
        volumes = set(compose.get("volumes", {}))
        dfs = dockerfiles()
        for name, svc in services.items():
            with self.subTest(service=name):
                self.assertTrue(pinned(svc["image"]), f"{name}: image {svc['image']} is not pinned")
                if "build" in svc:
                    b = svc["build"]
                    self.assertEqual(os.path.realpath(os.path.join(DOCKER, b["context"])), os.path.realpath(ROOT))
                    df = os.path.basename(b["dockerfile"])
                    self.assertIn(df, dfs)
                    dfs[df].stage(b["target"])
                for dep in svc.get("depends_on", []):
                    self.assertIn(dep, services)
                for mount in svc.get("volumes", []):
                    source = mount.split(":")[0]
                    if source.startswith("."):
                        self.assertTrue(os.path.exists(os.path.join(DOCKER, source)), f"{name}: mounts {source}")
                    else:
                        self.assertIn(source, volumes)
        # The worker dials the coordinator's gRPC port; Prometheus scrapes its metrics port.
        self.assertEqual(services["worker"]["environment"]["SINKSCOPE_COORDINATOR"], "coordinator:50051")
        self.assertIn("50051:50051", services["coordinator"]["ports"])
        self.assertIn("9464:9464", services["coordinator"]["ports"])
        self.assertEqual(services["worker"]["depends_on"]["coordinator"]["condition"], "service_healthy")
        coordinator_cmd = " ".join(r for op, r in dfs["Dockerfile"].stage("coordinator")["ops"] if op == "CMD")
        self.assertIn("0.0.0.0:50051", coordinator_cmd)
        self.assertIn("0.0.0.0:9464", coordinator_cmd)
        prom = yaml.safe_load(read(os.path.join(DEPLOY, "prometheus", "prometheus.yml")))
        targets = [t for sc in prom["scrape_configs"] for s in sc["static_configs"] for t in s["targets"]]
        self.assertEqual(targets, ["coordinator:9464"])
        # The checkpoint root is the same volume at the same path in coordinator and worker.
        ckpt = "checkpoints:/var/lib/sinkscope/checkpoints"
        self.assertIn(ckpt, services["coordinator"]["volumes"])
        self.assertIn(ckpt, services["worker"]["volumes"])
        self.assertIn("/var/lib/sinkscope/checkpoints", coordinator_cmd)
        # Grafana: the provider's path is where compose mounts the dashboards, the data
        # source is the compose Prometheus, the home dashboard exists.
        mounts = dict(m.split(":")[:2] for m in services["grafana"]["volumes"])
        provider = yaml.safe_load(read(os.path.join(DEPLOY, "grafana", "provisioning", "dashboards",
                                                    "sinkscope.yaml")))["providers"][0]
        self.assertEqual(mounts["../deploy/grafana/dashboards"], provider["options"]["path"])
        self.assertEqual(mounts["../deploy/grafana/provisioning"], "/etc/grafana/provisioning")
        home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
        self.assertTrue(home.startswith(provider["options"]["path"] + "/"))
        self.assertTrue(os.path.exists(os.path.join(DASHBOARDS, os.path.basename(home))))
        datasource = yaml.safe_load(read(os.path.join(DEPLOY, "grafana", "provisioning", "datasources",
                                                      "prometheus.yaml")))["datasources"][0]
        self.assertEqual(datasource["url"], "http://prometheus:9090")
        self.assertIn("9090:9090", services["prometheus"]["ports"])
        self.assertIn("--config.file=/etc/prometheus/prometheus.yml", services["prometheus"]["command"])


# --- Prometheus configuration and rules ---------------------------------------------------------


class PromtoolTest(unittest.TestCase):
    def promtool(self, *args):
        r = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120,
                           cwd=os.path.join(DEPLOY, "prometheus"))
        self.assertEqual(r.returncode, 0, f"promtool {' '.join(args)}:\n{r.stdout}\n{r.stderr}")
        return r.stdout + r.stderr

    def test_check_config(self):
        out = self.promtool("check", "config", "prometheus.yml")
        self.assertIn("SUCCESS", out)
        self.assertIn("1 rule files found", out)

    def test_check_rules(self):
        files = sorted(glob.glob(os.path.join(RULES, "*.yml")))
        self.assertTrue(files)
        self.assertIn("SUCCESS", self.promtool("check", "rules", *files))

    def test_rule_unit_tests(self):
        self.assertIn("SUCCESS", self.promtool("test", "rules", "tests/sinkscope_test.yml"))


# --- Kubernetes ----------------------------------------------------------------------------------

WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job")


def render(overlay):
    r = subprocess.run(["kubectl", "kustomize", overlay], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise AssertionError(f"kubectl kustomize {overlay}:\n{r.stderr}")
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def pod_spec(obj):
    return obj["spec"]["template"]["spec"] if obj["kind"] in WORKLOADS else None


class KustomizeTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        if shutil.which("kubectl") is None:
            raise unittest.SkipTest("kubectl is not installed (it is no Debian bookworm package, so "
                                    "scripts/packages.txt cannot provide it): the kustomize render checks are "
                                    "skipped; every other deploy test runs")
        cls.overlays = sorted(os.path.basename(p) for p in glob.glob(os.path.join(OVERLAYS, "*")))
        cls.rendered = {o: render(os.path.join(OVERLAYS, o)) for o in cls.overlays}

    def test_overlays_exist(self):
        self.assertEqual(self.overlays, ["cpu-dev", "gpu"])

    def test_rendered_objects_reference_what_exists(self):
        for overlay, objs in self.rendered.items():
            with self.subTest(overlay=overlay):
                self.check_objects(overlay, objs)

    def check_objects(self, overlay, objs):
        by_kind = {}
        for o in objs:
            by_kind.setdefault(o["kind"], {})[o["metadata"]["name"]] = o
        namespaces = set(by_kind.get("Namespace", {}))
        self.assertEqual(namespaces, {"sinkscope"})
        for o in objs:
            if o["kind"] != "Namespace":
                self.assertIn(o["metadata"].get("namespace"), namespaces, f"{o['kind']} {o['metadata']['name']}")
        configmaps = by_kind.get("ConfigMap", {})
        secrets = by_kind.get("Secret", {})
        pvcs = set(by_kind.get("PersistentVolumeClaim", {}))
        workloads = [o for o in objs if o["kind"] in WORKLOADS]
        self.assertEqual({(o["kind"], o["metadata"]["name"]) for o in workloads},
                         {("Deployment", "sinkscope-coordinator"), ("StatefulSet", "sinkscope-worker")})
        for w in workloads:
            name = f"{overlay}: {w['kind']} {w['metadata']['name']}"
            spec = pod_spec(w)
            template_labels = w["spec"]["template"]["metadata"]["labels"]
            for k, v in w["spec"]["selector"]["matchLabels"].items():
                self.assertEqual(template_labels.get(k), v, f"{name}: selector does not match its pods")
            claims = pvcs | {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            for v in volumes.values():
                if "configMap" in v:
                    self.assertIn(v["configMap"]["name"], configmaps, name)
                if "secret" in v:
                    self.assertIn(v["secret"]["secretName"], secrets, name)
                if "persistentVolumeClaim" in v:
                    self.assertIn(v["persistentVolumeClaim"]["claimName"], claims, name)
            for c in spec.get("initContainers", []) + spec["containers"]:
                cname = f"{name} container {c['name']}"
                self.assertTrue(pinned(c["image"]), f"{cname}: image {c['image']} is not pinned by tag")
                for m in c.get("volumeMounts", []):
                    self.assertIn(m["name"], volumes, cname)
                for e in c.get("env", []):
                    ref = e.get("valueFrom", {})
                    if "configMapKeyRef" in ref:
                        cm = ref["configMapKeyRef"]
                        self.assertIn(cm["name"], configmaps, cname)
                        self.assertIn(cm["key"], configmaps[cm["name"]]["data"], cname)
                    if "secretKeyRef" in ref:
                        self.assertIn(ref["secretKeyRef"]["name"], secrets, cname)
                for e in c.get("envFrom", []):
                    if "configMapRef" in e:
                        self.assertIn(e["configMapRef"]["name"], configmaps, cname)
                    if "secretRef" in e:
                        self.assertIn(e["secretRef"]["name"], secrets, cname)
                # $(VAR) in args must name a variable of the container.
                env_names = {e["name"] for e in c.get("env", [])}
                for arg in c.get("args", []) + c.get("command", []):
                    for var in re.findall(r"\$\((\w+)\)", arg):
                        self.assertIn(var, env_names, f"{cname}: $({var})")
                ports = {p["containerPort"] for p in c.get("ports", [])}
                port_names = {p["name"]: p["containerPort"] for p in c.get("ports", []) if "name" in p}
                for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                    probe = c.get(kind)
                    if not probe:
                        continue
                    for handler in ("grpc", "httpGet", "tcpSocket"):
                        if handler in probe:
                            port = probe[handler]["port"]
                            port = port_names.get(port, port)
                            self.assertIn(port, ports, f"{cname} {kind}: port {port} is not a container port")
            # What each workload needs of the others.
        coordinator = pod_spec(by_kind["Deployment"]["sinkscope-coordinator"])["containers"][0]
        for kind in ("readinessProbe", "livenessProbe"):
            self.assertEqual(coordinator[kind]["grpc"]["port"], 50051, f"{overlay}: coordinator {kind}")
        # Services select pods that exist, on ports those pods declare.
        for svc in by_kind.get("Service", {}).values():
            name = f"{overlay}: Service {svc['metadata']['name']}"
            selector = svc["spec"].get("selector")
            self.assertTrue(selector, f"{name}: no selector")
            selected = [w for w in workloads
                        if all(w["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in selector.items())]
            self.assertTrue(selected, f"{name}: selects no pods")
            for p in svc["spec"].get("ports", []):
                target = p.get("targetPort", p["port"])
                for w in selected:
                    declared = [(q.get("name"), q["containerPort"]) for c in pod_spec(w)["containers"]
                                for q in c.get("ports", [])]
                    self.assertTrue(any(target in pair for pair in declared),
                                    f"{name}: targetPort {target} is no port of {w['metadata']['name']}")
        # The StatefulSet's governing Service exists and is headless.
        sts = by_kind["StatefulSet"]["sinkscope-worker"]
        governing = by_kind["Service"][sts["spec"]["serviceName"]]
        self.assertEqual(governing["spec"].get("clusterIP"), "None")
        # The coordinator address of the ConfigMap is the coordinator Service's gRPC port.
        worker = pod_spec(sts)["containers"][0]
        cm_name = next(e["valueFrom"]["configMapKeyRef"]["name"] for e in worker["env"]
                       if e["name"] == "SINKSCOPE_COORDINATOR")
        host, port = configmaps[cm_name]["data"]["SINKSCOPE_COORDINATOR"].rsplit(":", 1)
        svc = by_kind["Service"][host]
        self.assertIn(int(port), [p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc"])
        # Coordinator and workers mount the checkpoint root at the path the coordinator hands out.
        ckpt_flag = next(a for a in coordinator["args"] if a.startswith("--checkpoint-root="))
        ckpt_path = ckpt_flag.split("=", 1)[1]
        for c in (coordinator, worker):
            mount = next(m for m in c["volumeMounts"] if m["mountPath"] == ckpt_path)
            volumes = {v["name"]: v for v in (pod_spec(by_kind["Deployment"]["sinkscope-coordinator"])["volumes"]
                                               if c is coordinator else pod_spec(sts)["volumes"])}
            self.assertEqual(volumes[mount["name"]]["persistentVolumeClaim"]["claimName"], "sinkscope-checkpoints")
        store = next(a for a in coordinator["args"] if a.startswith("--db=")).split("=", 1)[1]
        self.assertTrue(any(store.startswith(m["mountPath"] + "/") for m in coordinator["volumeMounts"]),
                        f"{overlay}: the store {store} is on no volume")
        # ServiceMonitor: selects the coordinator Service, on a port it has.
        for sm in by_kind.get("ServiceMonitor", {}).values():
            matched = [s for s in by_kind["Service"].values()
                       if all(s["metadata"].get("labels", {}).get(k) == v
                              for k, v in sm["spec"]["selector"]["matchLabels"].items())]
            self.assertEqual([s["metadata"]["name"] for s in matched], ["sinkscope-coordinator"])
            for ep in sm["spec"]["endpoints"]:
                self.assertIn(ep["port"], [p["name"] for p in matched[0]["spec"]["ports"]])
        self.assertIn("sinkscope-coordinator", by_kind.get("ServiceMonitor", {}))
        # GPU requests where GPUs are meant, none on the CPU development cluster.
        gpu = worker["resources"].get("limits", {}).get("nvidia.com/gpu")
        device_cm = next(e["valueFrom"]["configMapKeyRef"]["name"] for e in worker["env"]
                         if e["name"] == "SINKSCOPE_DEVICE")
        config = configmaps[device_cm]
        if overlay == "gpu":
            self.assertEqual(config["data"]["SINKSCOPE_DEVICE"], "cuda")  # the worker's --device
            self.assertEqual(str(gpu), "1")
            self.assertEqual(str(worker["resources"]["requests"]["nvidia.com/gpu"]), "1")
            self.assertTrue(worker["image"].startswith("ghcr.io/sinkscope/worker-cuda:"))
        else:
            self.assertEqual(config["data"]["SINKSCOPE_DEVICE"], "cpu")
            self.assertIsNone(gpu)
            self.assertNotIn("nvidia.com/gpu", worker["resources"].get("requests", {}))
            self.assertTrue(worker["image"].startswith("ghcr.io/sinkscope/worker-cpu:"))

    def test_dashboards_configmap_holds_the_dashboard_files(self):
        files = {os.path.basename(p): read(p) for p in glob.glob(os.path.join(DASHBOARDS, "*.json"))}
        for overlay, objs in self.rendered.items():
            with self.subTest(overlay=overlay):
                cms = [o for o in objs if o["kind"] == "ConfigMap"
                       and o["metadata"]["name"] == "sinkscope-grafana-dashboards"]
                self.assertEqual(len(cms), 1)
                self.assertEqual(cms[0]["metadata"]["labels"].get("grafana_dashboard"), "1")
                self.assertEqual(cms[0]["data"], files)

    def test_prometheusrule_is_the_rules_file(self):
        rules = yaml.safe_load(read(os.path.join(RULES, "sinkscope.yml")))
        for overlay, objs in self.rendered.items():
            with self.subTest(overlay=overlay):
                prs = [o for o in objs if o["kind"] == "PrometheusRule"]
                self.assertEqual(len(prs), 1)
                self.assertEqual(prs[0]["spec"]["groups"], rules["groups"],
                                 "deploy/k8s/base/monitoring.yaml and deploy/prometheus/rules/sinkscope.yml differ")


# --- Dashboards against a real Prometheus -------------------------------------------------------

SCRAPE_SECONDS = 1
LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(.*),\s*)?(\w+)\s*\)\s*$")
VARIABLE = re.compile(r"\$\{(\w+)(?::(\w+))?\}|\[\[(\w+)\]\]|\$(\w+)")
REGEX_SPECIAL = re.compile(r"([\\^$*+?.()|{}\[\]])")


def grafana_value(values, variable):
    """A variable's value as Grafana's Prometheus data source writes it into a query."""
    if variable.get("multi") or variable.get("includeAll"):
        escaped = [REGEX_SPECIAL.sub(r"\\\1", v) for v in values]
        return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"
    assert len(values) == 1
    return values[0].replace("\\", "\\\\").replace("'", "\\'")


def duration(seconds):
    return f"{max(1, int(math.ceil(seconds)))}s"


def interpolate(expr, values, builtins):
    def sub(m):
        name = m.group(1) or m.group(3) or m.group(4)
        if name in builtins:
            return builtins[name]
        if name.isdigit():
            return m.group(0)  # $1 of a label_replace: Grafana leaves names it does not know

        if name not in values:
            raise AssertionError(f"undefined variable ${name} in {expr}")
        return values[name]
    return VARIABLE.sub(sub, expr)


class DashboardTest(unittest.TestCase):
    """A short experiment (both arms, seven probes each) on a real coordinator and two workers,
    scraped every second by a real Prometheus that evaluates the recording rules every
    second; then every query of every dashboard, with its variables filled in as Grafana
    would, must return data."""

    @classmethod
    def setUpClass(cls):
        cls.cluster = Cluster(lease_seconds=3.0)
        cls.prom = None
        try:
            c = cls.cluster
            c.start_coordinator()
            c.start_worker("worker-a")
            c.start_worker("worker-b")
            # Prometheus from deploy/prometheus/prometheus.yml: same rule files and job,
            # the test's coordinator as the target, every second.
            config = yaml.safe_load(read(os.path.join(DEPLOY, "prometheus", "prometheus.yml")))
            config["global"]["scrape_interval"] = f"{SCRAPE_SECONDS}s"
            config["global"]["evaluation_interval"] = f"{SCRAPE_SECONDS}s"
            config["rule_files"] = [os.path.join(DEPLOY, "prometheus", f) for f in config["rule_files"]]
            (job,) = config["scrape_configs"]
            cls.job = job["job_name"]
            job["static_configs"] = [{"targets": [f"127.0.0.1:{c.metrics_port}"]}]
            cls.prom, cls.prom_port = harness.start_prometheus(os.path.join(c.dir, "prometheus"),
                                                               yaml.safe_dump(config))
            cls.prom_started = time.time()
            # Prometheus scrapes a few seconds after it is ready: train only once it does, so
            # it sees the experiment progress rather than only its end.
            wait_for(lambda: cls.query(f'up{{job="{cls.job}"}} == 1'), 60, "Prometheus to scrape the coordinator")
            corpus = harness.write_corpus(c.dir)
            spec = harness.tiny_experiment("deploy", corpus, steps=60, probe_every=10)
            path = os.path.join(c.dir, "deploy.json")
            with open(path, "w") as f:
                json.dump(spec, f)
            cls.experiment_id = c.cli_json("submit", path)["experiment_id"]
            status = c.wait_state(cls.experiment_id, {"COMPLETED", "FAILED_RUNS"}, timeout=600)
            assert status["state"] == "COMPLETED", c.logs()
            cls.runs = sorted(r.get("run_id") or r.get("runId") for r in status["runs"])

            # Prometheus has the final state of both runs and has evaluated every rule.
            def scraped():
                final = cls.query(f'sinkscope_probe_step{{experiment="{cls.experiment_id}"}} == 60')
                return len(final) == 2
            wait_for(scraped, 60, "Prometheus to scrape the runs' last probes")
            records = [r["record"] for g in yaml.safe_load(read(os.path.join(RULES, "sinkscope.yml")))["groups"]
                       for r in g["rules"] if "record" in r]
            # A few evaluations of each, so that range queries ending now find them too.
            for record in records:
                wait_for(lambda: cls.query(f"count_over_time({record}[1m]) >= 3"), 60,
                         f"the recording rule {record}")
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls):
        if os.environ.get("SINKSCOPE_KEEP_LOGS"):
            print(cls.cluster.logs())
        if cls.prom:
            cls.prom.stop()
        cls.cluster.close()
        shutil.rmtree(cls.cluster.dir, ignore_errors=True)

    @classmethod
    def query(cls, expr):
        return harness.prometheus_api(cls.prom_port, "query", query=expr)["result"]

    def builtins(self):
        now = time.time()
        range_s = now - self.prom_started + 5
        interval = max(SCRAPE_SECONDS, range_s / 1000)  # Grafana: range / max data points, at least the scrape
        rate_interval = max(interval + SCRAPE_SECONDS, 4 * SCRAPE_SECONDS)
        b = {"__range": duration(range_s), "__range_s": str(int(math.ceil(range_s))),
             "__range_ms": str(int(range_s * 1000)), "__interval": duration(interval),
             "__interval_ms": str(int(interval * 1000)), "__rate_interval": duration(rate_interval)}
        return b, now - range_s, now, interval

    def resolve_variables(self, dashboard):
        """Each query variable from its label_values query, in order, as Grafana does;
        the experiment is the test's, multi-value variables take all their values."""
        builtins, start, end, _ = self.builtins()
        values, chosen = {}, {}
        variables = dashboard["templating"]["list"]
        for v in variables:
            if v["type"] == "datasource":
                self.assertEqual(v["query"], "prometheus")
                continue
            self.assertEqual(v["type"], "query", v["name"])
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            self.assertEqual(q, v.get("definition", q))
            m = LABEL_VALUES.match(q)
            self.assertTrue(m, f"{v['name']}: {q} is not label_values(...)")
            selector, label = m.group(1), m.group(2)
            params = {"start": start, "end": end}
            if selector:
                params["match[]"] = interpolate(selector, values, builtins)
            found = sorted(harness.prometheus_api(self.prom_port, f"label/{label}/values", **params))
            self.assertTrue(found, f"variable {v['name']}: {q} found no values")
            if v["name"] == "experiment":
                self.assertIn(self.experiment_id, found)
                found = [self.experiment_id]
            chosen[v["name"]] = found
            values[v["name"]] = grafana_value(found, v)
        return values, chosen, variables

    def test_dashboards_are_well_formed(self):
        boards = dashboards()
        self.assertEqual(set(boards), {"runs.json", "gradient-sinks.json", "attention-sinks.json", "fleet.json"})
        self.assertEqual(len({b["uid"] for b in boards.values()}), len(boards))
        for name, board in boards.items():
            with self.subTest(dashboard=name):
                names = [v["name"] for v in board["templating"]["list"]]
                for required in ("datasource", "experiment", "arm", "run"):
                    self.assertIn(required, names)
                ids = [p["id"] for p in all_panels(board["panels"])]
                self.assertEqual(len(ids), len(set(ids)), "panel ids repeat")
                for p in all_panels(board["panels"]):
                    g = p["gridPos"]
                    self.assertLessEqual(g["x"] + g["w"], 24, p["title"])
                    if p.get("targets"):
                        self.assertEqual(p["datasource"], {"type": "prometheus", "uid": "${datasource}"})
                        for t in p["targets"]:
                            self.assertEqual(t["datasource"], p["datasource"])
                            self.assertTrue(t["expr"].strip())
                    if "repeat" in p:
                        self.assertIn(p["repeat"], names)

    def test_variables_find_the_experiment_its_arms_runs_and_layers(self):
        for name, board in dashboards().items():
            with self.subTest(dashboard=name):
                _, chosen, _ = self.resolve_variables(board)
                self.assertEqual(chosen["experiment"], [self.experiment_id])
                self.assertEqual(chosen["arm"], ["BASELINE", "VSCALE"])
                self.assertEqual(chosen["run"], self.runs)
                if "layer" in chosen:
                    self.assertEqual(chosen["layer"], ["0", "1"])

    def test_every_panel_query_returns_data(self):
        evaluated = 0
        for name, board in dashboards().items():
            values, chosen, variables = self.resolve_variables(board)
            by_name = {v["name"]: v for v in variables}
            for panel in all_panels(board["panels"]):
                # A repeated panel is drawn once per value of its variable, with that one value.
                repeats = [None]
                if panel.get("repeat"):
                    repeats = chosen[panel["repeat"]]
                for repeat_value in repeats:
                    panel_values = dict(values)
                    if repeat_value is not None:
                        panel_values[panel["repeat"]] = grafana_value([repeat_value],
                                                                      {**by_name[panel["repeat"]], "multi": False,
                                                                       "includeAll": False})
                    for target in panel.get("targets", []):
                        with self.subTest(dashboard=name, panel=panel["title"], repeat=repeat_value,
                                          ref=target["refId"]):
                            self.check_target(target, panel_values)
                            evaluated += 1
        self.assertGreaterEqual(evaluated, 40)

    def check_target(self, target, values):
        builtins, start, end, interval = self.builtins()
        expr = interpolate(target["expr"], values, builtins)
        if target.get("instant"):
            result = harness.prometheus_api(self.prom_port, "query", query=expr, time=end)["result"]
        else:
            result = harness.prometheus_api(self.prom_port, "query_range", query=expr, start=start, end=end,
                                            step=max(1, int(interval)))["result"]
        self.assertTrue(result, f"no data for {expr}")
        # Every label the legend names is on every series.
        for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")):
            for series in result:
                self.assertIn(label, series["metric"], f"legend {{{{{label}}}}} of {expr}")

    def test_ingest_rate_was_seen_while_training(self):
        rate = self.query("max_over_time(sinkscope:step_reports:rate1m[10m])")
        self.assertTrue(rate and float(rate[0]["value"][1]) > 0, rate)
        self.assertEqual(float(self.query("max_over_time(sinkscope_workers_connected[10m])")[0]["value"][1]), 2)
        up = self.query(f'up{{job="{self.job}"}}')
        self.assertEqual([float(s["value"][1]) for s in up], [1.0])

    def test_promtool_checks_the_coordinators_own_exposition(self):
        """`promtool check metrics` (names, HELP/TYPE, units, counters ending in _total) on what the
        coordinator serves while it holds steps and probe reports of every arm."""
        text = harness.http_get(f"http://127.0.0.1:{self.cluster.metrics_port}/metrics")[2]
        self.assertIn("sinkscope_probe_gradient_sink_ratio", text)
        r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
        self.assertEqual(r.returncode, 0, f"promtool check metrics:\n{r.stdout}\n{r.stderr}")
        self.assertEqual(r.stdout.strip() + r.stderr.strip(), "", "promtool has lint findings")

    def test_health_client_is_the_healthcheck(self):
        """sinkscope-health, the images' HEALTHCHECK, exits 0 on the serving coordinator
        and 1 where nothing serves."""
        health = harness.binary("sinkscope-health")
        r = subprocess.run([health, "--address", self.cluster.address, "--timeout", "20"], capture_output=True,
                           text=True, timeout=30)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("SERVING", r.stdout)
        r = subprocess.run([health, "--address", f"127.0.0.1:{harness.free_port()}", "--timeout", "2"],
                           capture_output=True, text=True, timeout=30)
        self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
        r = subprocess.run([health, "--address", self.cluster.address, "--service", "no.such.Service", "--timeout", "20"],
                           capture_output=True, text=True, timeout=30)
        self.assertEqual(r.returncode, 1)
        self.assertIn("NOT_FOUND", r.stderr)
        r = subprocess.run([health, "--bogus"], capture_output=True, text=True, timeout=30)
        self.assertEqual(r.returncode, 2)


if __name__ == "__main__":
    unittest.main(verbosity=2)
