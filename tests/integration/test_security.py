"""Security of the service end to end, with real binaries on loopback: TLS and mutual TLS
on both gRPC services, a bearer token for the CLI side and another for workers
(UNAUTHENTICATED otherwise), HTTP basic auth on /metrics, and no secret in any log line
or command line. Certificates come from throwaway CAs made with the openssl CLI. Run by
ctest (security_integration); docs/security.md describes the flags."""

import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import unittest

import grpc

import harness
from harness import Cluster, wait_for

# The tests decide every credential themselves.
for _var in ("SINKSCOPE_TOKEN", "SINKSCOPE_TOKEN_FILE", "SINKSCOPE_CLIENT_TOKEN", "SINKSCOPE_WORKER_TOKEN",
             "SINKSCOPE_METRICS_BASIC_AUTH", "SINKSCOPE_COORDINATOR"):
    os.environ.pop(_var, None)

PKI = {}  # name → path, filled by setUpModule
SVC = "/sinkscope.v1.ExperimentService/"


def setUpModule():
    folder = tempfile.mkdtemp(prefix="sinkscope-pki-")
    PKI["dir"] = folder
    issue = harness.make_pki(folder, "ca")
    PKI["ca"] = issue.ca_crt
    PKI["ca_key"] = issue.ca_key
    PKI["server_crt"], PKI["server_key"] = issue("server", "localhost", "serverAuth", "DNS:localhost,IP:127.0.0.1")
    PKI["client_crt"], PKI["client_key"] = issue("client", "sinkscope-cli", "clientAuth")
    PKI["worker_crt"], PKI["worker_key"] = issue("worker", "sinkscope-worker", "clientAuth")
    # A client certificate from a CA the coordinator does not trust.
    rogue = harness.make_pki(os.path.join(folder, "rogue"), "rogue")
    PKI["rogue_crt"], PKI["rogue_key"] = rogue("intruder", "intruder", "clientAuth")
    PKI["rogue_ca_key"] = rogue.ca_key


def tearDownModule():
    shutil.rmtree(PKI.get("dir", ""), ignore_errors=True)


def key_material():
    """Every base64 line of every private key made for the tests."""
    lines = []
    for name in ("ca_key", "server_key", "client_key", "worker_key", "rogue_key", "rogue_ca_key"):
        with open(PKI[name]) as f:
            lines += [l.strip() for l in f if l.strip() and not l.startswith("-----")]
    return lines


class AuditedCluster(Cluster):
    """A Cluster that keeps what every CLI call printed, for the log audit."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.transcript = []

    def cli(self, *args, check=True, **kwargs):
        r = super().cli(*args, check=False, **kwargs)
        self.transcript.append(f"$ sinkscope {' '.join(args)} -> {r.returncode}\n{r.stdout}{r.stderr}")
        if check and r.returncode != 0:
            raise AssertionError(f"sinkscope {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
        return r

    def everything_printed(self):
        parts = [f"--- {p.name} ---\n{p.output()}" for p in [self.coordinator, *self.workers.values()] if p]
        return "\n".join(parts + self.transcript)

    def command_lines(self):
        """The argv of every live process of the cluster, as `ps` shows it."""
        out = []
        for p in [self.coordinator, *self.workers.values()]:
            if p and p.alive():
                with open(f"/proc/{p.proc.pid}/cmdline", "rb") as f:
                    out.append(f.read().replace(b"\0", b" ").decode())
        return "\n".join(out)


class SecurityCase(unittest.TestCase):
    """Shared by the test classes: one cluster per class, audited at the end."""

    cluster = None
    secrets = {}  # what must never be printed: name → value

    @classmethod
    def tearDownClass(cls):
        if cls.cluster is None:
            return
        if os.environ.get("SINKSCOPE_KEEP_LOGS"):
            print(cls.cluster.everything_printed())
        cls.cluster.close()
        shutil.rmtree(cls.cluster.dir, ignore_errors=True)

    def write_experiment(self, name, **kwargs):
        c = self.cluster
        corpus = os.path.join(c.dir, "corpus.txt")
        if not os.path.exists(corpus):
            harness.write_corpus(c.dir)
        spec = harness.tiny_experiment(name, corpus, **kwargs)
        path = os.path.join(c.dir, name + ".json")
        with open(path, "w") as f:
            json.dump(spec, f)
        return path

    def submit(self, path):
        out = json.loads(self.cluster.cli("--json", "submit", path).stdout)
        return out.get("experiment_id") or out.get("experimentId")

    def runs_of(self, status):
        return status.get("runs") or []

    def worker_of(self, run):
        return run.get("worker_id") or run.get("workerId")

    def assert_no_secret_printed(self):
        """No token, password or key material in any log line, CLI output or argv."""
        text = self.cluster.everything_printed()
        argv = self.cluster.command_lines()
        self.assertTrue(text.strip(), "no logs to audit")
        for name, value in self.secrets.items():
            self.assertNotIn(value, text, f"the {name} appears in a log or CLI output")
            self.assertNotIn(value, argv, f"the {name} appears on a command line")
        for line in key_material():
            self.assertNotIn(line, text, "private key material appears in a log or CLI output")

    def metric(self, name, user=None, password=None):
        status, _, body = harness.http_get(f"http://127.0.0.1:{self.cluster.metrics_port}/metrics", user, password)
        self.assertEqual(status, 200, body)
        m = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", body, re.M)
        return float(m.group(1)) if m else None


def python_call(channel, method, request, response_type, metadata=None):
    return channel.unary_unary(SVC + method, request_serializer=lambda m: m.SerializeToString(),
                               response_deserializer=response_type.FromString)(request, timeout=10,
                                                                              metadata=metadata)


def health(channel):
    """The standard health service's answer (b"\\x08\\x01" is SERVING)."""
    return channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=lambda b: b,
                               response_deserializer=lambda b: b)(b"", timeout=10)


def read(path):
    with open(path, "rb") as f:
        return f.read()


# --- TLS ------------------------------------------------------------------------------------


class TlsTest(SecurityCase):
    """The coordinator serves TLS; clients verify it with the test CA."""

    @classmethod
    def setUpClass(cls):
        cls.cluster = AuditedCluster(cli_args=["--tls-ca", PKI["ca"]])
        cls.cluster.start_coordinator(["--tls-cert", PKI["server_crt"], "--tls-key", PKI["server_key"]])
        # The server name override: the certificate names localhost, the address is an IP.
        cls.cluster.start_worker("worker-tls", ["--tls-ca", PKI["ca"], "--tls-server-name", "localhost"])

    def test_cli_with_the_ca_works(self):
        r = self.cluster.cli("list")
        self.assertEqual(r.returncode, 0, r.stderr)

    def test_cli_without_the_ca_fails_clearly(self):
        # Plaintext against a TLS port: unreachable, with the hint to pass --tls-ca.
        r = self.cluster.cli("list", check=False, global_args=["--timeout", "30"])
        self.assertIn(r.returncode, (3, 4), r.stderr)
        self.assertIn("--tls-ca", r.stderr)
        # TLS against the system CAs, which do not know the test CA: the handshake fails.
        r = self.cluster.cli("list", check=False, global_args=["--tls", "--timeout", "30"])
        self.assertEqual(r.returncode, 4, r.stderr)
        self.assertIn("TLS handshake with the coordinator", r.stderr)
        self.assertIn("--tls-ca", r.stderr)

    def test_cli_with_a_name_not_in_the_certificate_fails(self):
        r = self.cluster.cli("list", check=False,
                             global_args=["--tls-ca", PKI["ca"], "--tls-server-name", "other.example", "--timeout", "30"])
        self.assertEqual(r.returncode, 4, r.stderr)
        self.assertIn("--tls-server-name", r.stderr)

    def test_worker_connects_over_tls(self):
        wait_for(lambda: self.metric("sinkscope_workers_connected") == 1, 60, "the TLS worker to register")
        wait_for(lambda: "event=registered" in self.cluster.workers["worker-tls"].output(), 30,
                 "the TLS worker to log its registration")

    def test_python_client_over_tls(self):
        pb = harness.python_stubs()
        creds = grpc.ssl_channel_credentials(root_certificates=read(PKI["ca"]))
        with grpc.secure_channel(self.cluster.address, creds) as channel:
            python_call(channel, "ListExperiments", pb.ListExperimentsRequest(), pb.ListExperimentsResponse)
            self.assertEqual(health(channel), b"\x08\x01")
        with grpc.insecure_channel(self.cluster.address) as channel:
            with self.assertRaises(grpc.RpcError) as e:
                python_call(channel, "ListExperiments", pb.ListExperimentsRequest(), pb.ListExperimentsResponse)
            self.assertEqual(e.exception.code(), grpc.StatusCode.UNAVAILABLE)

    def test_z_no_secret_in_logs(self):
        self.assert_no_secret_printed()


# --- mutual TLS -----------------------------------------------------------------------------


class MutualTlsTest(SecurityCase):
    """The coordinator requires client certificates signed by the test CA."""

    @classmethod
    def setUpClass(cls):
        cls.cluster = AuditedCluster(
            cli_args=["--tls-ca", PKI["ca"], "--tls-cert", PKI["client_crt"], "--tls-key", PKI["client_key"]])
        cls.cluster.start_coordinator(["--tls-cert", PKI["server_crt"], "--tls-key", PKI["server_key"],
                                       "--tls-client-ca", PKI["ca"]])
        cls.cluster.start_worker("worker-nocert", ["--tls-ca", PKI["ca"]])
        cls.cluster.start_worker("worker-rogue", ["--tls-ca", PKI["ca"], "--tls-cert", PKI["rogue_crt"],
                                                  "--tls-key", PKI["rogue_key"]])

    def test_1_cli_without_a_client_certificate_is_rejected(self):
        r = self.cluster.cli("list", check=False, global_args=["--tls-ca", PKI["ca"], "--timeout", "30"])
        self.assertEqual(r.returncode, 4, r.stderr)
        self.assertIn("TLS handshake", r.stderr)
        self.assertIn("--tls-cert", r.stderr)

    def test_1_cli_with_a_certificate_of_another_ca_is_rejected(self):
        r = self.cluster.cli("list", check=False, global_args=[
            "--tls-ca", PKI["ca"], "--tls-cert", PKI["rogue_crt"], "--tls-key", PKI["rogue_key"], "--timeout", "30"])
        self.assertEqual(r.returncode, 4, r.stderr)

    def test_1_cli_with_its_certificate_works(self):
        self.cluster.cli("list")

    def test_1_python_client_needs_a_certificate(self):
        pb = harness.python_stubs()
        bare = grpc.ssl_channel_credentials(root_certificates=read(PKI["ca"]))
        with grpc.secure_channel(self.cluster.address, bare) as channel:
            with self.assertRaises(grpc.RpcError) as e:
                python_call(channel, "ListExperiments", pb.ListExperimentsRequest(), pb.ListExperimentsResponse)
            self.assertEqual(e.exception.code(), grpc.StatusCode.UNAVAILABLE)
        full = grpc.ssl_channel_credentials(root_certificates=read(PKI["ca"]), private_key=read(PKI["client_key"]),
                                            certificate_chain=read(PKI["client_crt"]))
        with grpc.secure_channel(self.cluster.address, full) as channel:
            python_call(channel, "ListExperiments", pb.ListExperimentsRequest(), pb.ListExperimentsResponse)

    def test_2_worker_with_its_certificate_trains_an_experiment(self):
        c = self.cluster
        c.start_worker("worker-mtls", ["--tls-ca", PKI["ca"], "--tls-cert", PKI["worker_crt"],
                                       "--tls-key", PKI["worker_key"], "--tls-server-name", "localhost"])
        eid = self.submit(self.write_experiment("mtls", steps=10, probe_every=5, arms=("vscale",)))
        status = c.wait_state(eid, {"COMPLETED", "FAILED_RUNS"}, timeout=300)
        self.assertEqual(status["state"], "COMPLETED", c.logs())
        self.assertEqual([self.worker_of(r) for r in self.runs_of(status)], ["worker-mtls"])
        self.assertEqual(self.metric("sinkscope_workers_connected"), 1)

    def test_3_workers_without_a_trusted_certificate_never_register(self):
        for name in ("worker-nocert", "worker-rogue"):
            w = self.cluster.workers[name]
            self.assertTrue(w.alive(), w.output())  # retrying with back-off
            # An error that says what to check, logged on the first attempt.
            wait_for(lambda: "event=tls_failed" in w.output(), 60, f"{name} to log tls_failed")
            out = w.output()
            self.assertNotIn("event=registered", out)
            self.assertNotIn("event=assignment", out)
            self.assertNotIn("event=run_start", out)

    def test_z_no_secret_in_logs(self):
        self.assert_no_secret_printed()


# --- bearer tokens and /metrics basic auth ------------------------------------------------------


class TokenTest(SecurityCase):
    """Plaintext gRPC with a client token, a different worker token, and basic auth on /metrics."""

    @classmethod
    def setUpClass(cls):
        cls.client_token = secrets.token_urlsafe(32)
        cls.worker_token = secrets.token_urlsafe(32)
        cls.wrong_token = secrets.token_urlsafe(32)
        cls.metrics_user, cls.metrics_password = "prometheus", secrets.token_urlsafe(24)
        cls.secrets = {"client token": cls.client_token, "worker token": cls.worker_token,
                       "wrong token": cls.wrong_token, "metrics password": cls.metrics_password}
        folder = tempfile.mkdtemp(prefix="sinkscope-secrets-")
        cls.secret_dir = folder
        cls.client_token_file = harness.write_secret(folder, "client.token", cls.client_token)
        cls.worker_token_file = harness.write_secret(folder, "worker.token", cls.worker_token)
        cls.wrong_token_file = harness.write_secret(folder, "wrong.token", cls.wrong_token)
        cls.metrics_auth_file = harness.write_secret(folder, "metrics.auth",
                                                     f"{cls.metrics_user}:{cls.metrics_password}")
        cls.cluster = AuditedCluster(cli_args=["--token-file", cls.client_token_file])
        cls.cluster.start_coordinator(["--client-token-file", cls.client_token_file,
                                       "--worker-token-file", cls.worker_token_file,
                                       "--metrics-basic-auth-file", cls.metrics_auth_file])

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        shutil.rmtree(cls.secret_dir, ignore_errors=True)

    def scrape(self):
        return self.metric("sinkscope_workers_connected", self.metrics_user, self.metrics_password)

    def assert_rejected(self, r):
        self.assertEqual(r.returncode, 4, r.stdout + r.stderr)
        self.assertIn("the coordinator rejected the credentials: UNAUTHENTICATED", r.stderr)

    def test_1_cli_without_a_token_is_unauthenticated(self):
        r = self.cluster.cli("list", check=False, global_args=[])
        self.assert_rejected(r)
        self.assertIn("--token-file", r.stderr)

    def test_1_cli_with_a_wrong_token_is_unauthenticated(self):
        self.assert_rejected(self.cluster.cli("list", check=False, global_args=["--token-file", self.wrong_token_file]))
        # The worker token is not a client token.
        self.assert_rejected(self.cluster.cli("list", check=False,
                                              global_args=["--token-file", self.worker_token_file]))
        # Streams too: watch is refused before it starts.
        self.assert_rejected(self.cluster.cli("watch", "nope-1", check=False,
                                              global_args=["--token-file", self.wrong_token_file]))

    def test_1_cli_with_the_token_works(self):
        self.cluster.cli("list")
        env = {**os.environ, "SINKSCOPE_TOKEN_FILE": self.client_token_file}
        self.cluster.cli("list", global_args=[], env=env)
        env = {**os.environ, "SINKSCOPE_TOKEN": self.client_token}
        self.cluster.cli("list", global_args=[], env=env)

    def test_2_workers_with_the_wrong_token_get_no_assignment(self):
        c = self.cluster
        # The client token is not a worker token; no token at all is not either.
        c.start_worker("worker-client-token", ["--token-file", self.client_token_file])
        c.start_worker("worker-no-token")
        eid = self.submit(self.write_experiment("tokens", steps=10, probe_every=5, arms=("baseline",)))
        for name in ("worker-client-token", "worker-no-token"):
            w = c.workers[name]
            # Rejected, and rejected again after a back-off: it keeps retrying.
            wait_for(lambda: w.output().count("event=auth_rejected") >= 2, 60, f"{name} to be rejected twice")
            self.assertIn("code=UNAUTHENTICATED", w.output())
            self.assertTrue(w.alive(), w.output())
        self.assertIn("token=\"none sent\"", c.workers["worker-no-token"].output())
        self.assertEqual([r.get("state") for r in self.runs_of(c.status(eid))], ["QUEUED"])
        self.assertEqual(self.scrape(), 0)
        self.assertIn("event=auth_rejected service=WorkerService method=Session", c.coordinator.output())
        # The right worker token: it registers and trains the queued run.
        c.start_worker("worker-right", ["--token-file", self.worker_token_file])
        status = c.wait_state(eid, {"COMPLETED", "FAILED_RUNS"}, timeout=300)
        self.assertEqual(status["state"], "COMPLETED", c.logs())
        self.assertEqual([self.worker_of(r) for r in self.runs_of(status)], ["worker-right"])
        for name in ("worker-client-token", "worker-no-token"):
            out = c.workers[name].output()
            self.assertNotIn("event=registered", out)
            self.assertNotIn("event=assignment", out)
        self.assertEqual(self.scrape(), 1)

    def test_3_python_client_without_the_token_is_unauthenticated(self):
        pb = harness.python_stubs()
        with grpc.insecure_channel(self.cluster.address) as channel:
            for metadata in (None, [("authorization", f"Bearer {self.worker_token}")],
                             [("authorization", self.client_token)]):  # not a bearer token
                with self.assertRaises(grpc.RpcError) as e:
                    python_call(channel, "ListExperiments", pb.ListExperimentsRequest(), pb.ListExperimentsResponse,
                                metadata=metadata)
                self.assertEqual(e.exception.code(), grpc.StatusCode.UNAUTHENTICATED)
                self.assertEqual(e.exception.details(), "missing or invalid bearer token")
            listed = python_call(channel, "ListExperiments", pb.ListExperimentsRequest(), pb.ListExperimentsResponse,
                                 metadata=[("authorization", f"Bearer {self.client_token}")])
            self.assertTrue(listed.experiments)
            # The health service stays open (probes use it).
            self.assertEqual(health(channel), b"\x08\x01")
        self.assertIn("event=auth_rejected service=ExperimentService", self.cluster.coordinator.output())

    def test_4_metrics_need_basic_auth(self):
        url = f"http://127.0.0.1:{self.cluster.metrics_port}/metrics"
        status, headers, _ = harness.http_get(url)
        self.assertEqual(status, 401)
        self.assertIn("Basic", headers.get("WWW-Authenticate", ""))
        status, _, _ = harness.http_get(url, self.metrics_user, self.wrong_token)
        self.assertEqual(status, 401)
        status, _, _ = harness.http_get(url, "someone", self.metrics_password)
        self.assertEqual(status, 401)
        status, _, body = harness.http_get(url, self.metrics_user, self.metrics_password)
        self.assertEqual(status, 200)
        self.assertIn("sinkscope_workers_connected", body)

    def test_z_no_secret_in_logs(self):
        self.assert_no_secret_printed()


# --- configuration --------------------------------------------------------------------------


class ConfigTest(unittest.TestCase):
    """Security settings that cannot work are refused at start (exit 2), without echoing
    a secret; tokens may come from the environment instead of files."""

    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="sinkscope-config-")
        cls.token = secrets.token_urlsafe(32)
        cls.token_file = harness.write_secret(cls.dir, "a.token", cls.token)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.dir, ignore_errors=True)

    def coordinator(self, *args, env=None):
        return subprocess.run([harness.binary("sinkscope-coordinator"), "--listen", "127.0.0.1:0",
                               "--metrics-listen", "127.0.0.1:0", "--db", os.path.join(self.dir, "store.db"), *args],
                              capture_output=True, text=True, timeout=30, cwd=self.dir, env=env)

    def refused(self, r, *words):
        self.assertEqual(r.returncode, 2, r.stdout + r.stderr)
        for w in words:
            self.assertIn(w, r.stderr)
        self.assertNotIn(self.token, r.stdout + r.stderr)

    def test_coordinator_refuses_bad_settings(self):
        self.refused(self.coordinator("--client-token-file", self.token_file, "--worker-token-file", self.token_file),
                     "the same")
        self.refused(self.coordinator("--tls-cert", PKI["server_crt"]), "--tls-key")
        self.refused(self.coordinator("--tls-client-ca", PKI["ca"]), "--tls-cert")
        self.refused(self.coordinator("--client-token-file", os.path.join(self.dir, "missing")), "cannot open")
        empty = harness.write_secret(self.dir, "empty.token", "")
        self.refused(self.coordinator("--client-token-file", empty), "is empty")
        self.refused(self.coordinator("--metrics-basic-auth-file", self.token_file), "user:password")
        spaced = harness.write_secret(self.dir, "spaced.token", f"two {self.token}")
        self.refused(self.coordinator("--worker-token-file", spaced), "printable ASCII")
        self.refused(self.coordinator("--tls-cert", self.token_file, "--tls-key", PKI["server_key"]), "not a PEM")
        # A key that does not belong to the certificate: gRPC cannot listen with them.
        r = self.coordinator("--tls-cert", PKI["server_crt"], "--tls-key", PKI["client_key"])
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertIn("does --tls-key belong to --tls-cert", r.stderr)

    def test_clients_refuse_bad_settings(self):
        worker = subprocess.run([harness.binary("sinkscope-worker"), "--tls-cert", PKI["client_crt"]],
                                capture_output=True, text=True, timeout=30)
        self.assertEqual(worker.returncode, 2, worker.stderr)
        self.assertIn("--tls-key", worker.stderr)
        cli = subprocess.run([harness.binary("sinkscope"), "--tls-cert", PKI["client_crt"], "list"],
                             capture_output=True, text=True, timeout=30)
        self.assertEqual(cli.returncode, 2, cli.stderr)
        self.assertIn("--tls-key", cli.stderr)
        cli = subprocess.run([harness.binary("sinkscope"), "--tls-server-name", "localhost", "list"],
                             capture_output=True, text=True, timeout=30)
        self.assertEqual(cli.returncode, 2, cli.stderr)
        cli = subprocess.run([harness.binary("sinkscope"), "--token-file", os.path.join(self.dir, "missing"), "list"],
                             capture_output=True, text=True, timeout=30)
        self.assertEqual(cli.returncode, 2, cli.stderr)

    def test_tokens_from_the_environment(self):
        worker_token = secrets.token_urlsafe(32)
        c = AuditedCluster()
        try:
            env = {**os.environ, "SINKSCOPE_CLIENT_TOKEN": self.token, "SINKSCOPE_WORKER_TOKEN": worker_token}
            c.start_coordinator(env=env)
            self.assertIn("client_auth=token worker_auth=token", c.coordinator.output())
            r = c.cli("list", check=False)
            self.assertEqual(r.returncode, 4, r.stderr)
            c.cli("list", env={**os.environ, "SINKSCOPE_TOKEN": self.token})
            c.start_worker("worker-env", env={**os.environ, "SINKSCOPE_WORKER_TOKEN": worker_token})
            wait_for(lambda: "event=registered" in c.workers["worker-env"].output(), 60, "the worker to register")
            text = c.everything_printed()
            self.assertNotIn(self.token, text)
            self.assertNotIn(worker_token, text)
        finally:
            c.close()
            shutil.rmtree(c.dir, ignore_errors=True)


if __name__ == "__main__":
    unittest.main(verbosity=2)
