"""End-to-end tests of the service with real binaries on loopback, a real SQLite file, a
real Prometheus and a gRPC client that is not ours. Run by ctest (service_integration)."""

import filecmp
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import unittest

import grpc

import harness
from harness import Cluster, wait_for, field


def runs_of(status):
    return field(status, "runs") or []


class ServiceTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.cluster = Cluster(lease_seconds=3.0)
        cls.cluster.start_coordinator()
        cls.cluster.start_worker("worker-a")
        cls.corpus = harness.write_corpus(cls.cluster.dir)
        cls.experiment_id = None

    @classmethod
    def tearDownClass(cls):
        if os.environ.get("SINKSCOPE_KEEP_LOGS"):
            print(cls.cluster.logs())
        cls.cluster.close()
        shutil.rmtree(cls.cluster.dir, ignore_errors=True)

    def write_experiment(self, name, **kwargs):
        spec = harness.tiny_experiment(name, self.corpus, **kwargs)
        path = os.path.join(self.cluster.dir, name + ".json")
        with open(path, "w") as f:
            json.dump(spec, f)
        return path, spec

    def submit(self, path):
        out = self.cluster.cli_json("submit", path)
        return field(out, "experiment_id")

    # --- submit → train → stored → compare / export -----------------------------------
    def test_1_submit_trains_stores_compares_and_exports(self):
        c = self.cluster
        path, spec = self.write_experiment("e2e", steps=30, probe_every=5)
        eid = self.submit(path)
        self.assertTrue(eid)
        type(self).experiment_id = eid
        status = c.wait_state(eid, {"COMPLETED", "FAILED_RUNS"}, timeout=600)
        self.assertEqual(status["state"], "COMPLETED", c.logs())
        runs = runs_of(status)
        self.assertEqual(len(runs), 2)
        want_probes = harness.expected_probe_steps(30, 5)
        for run in runs:
            run_id = field(run, "run_id")
            steps = [s for (s,) in c.sql("SELECT step FROM step_metrics WHERE run_id = ? ORDER BY step", run_id)]
            self.assertEqual(steps, list(range(1, 31)), run_id)
            probes = [s for (s,) in c.sql("SELECT step FROM probe_reports WHERE run_id = ? ORDER BY step", run_id)]
            self.assertEqual(probes, want_probes, run_id)
            ckpt = os.path.join(c.dir, "checkpoints", eid, run_id)
            self.assertTrue(os.path.exists(os.path.join(ckpt, "checkpoint.bin")), ckpt)
            self.assertTrue(os.path.exists(os.path.join(ckpt, "hf", "model.safetensors")), ckpt)
        # compare: both arms, every layer, numbers from the stored probes.
        cmp = c.cli_json("compare", eid)
        arms = field(cmp, "arms")
        self.assertEqual([a["arm"] for a in arms], ["BASELINE", "VSCALE"])
        for a in arms:
            self.assertEqual(int(field(a, "step")), 30)
            self.assertEqual(len(a["layers"]), 2)
            for layer in a["layers"]:
                self.assertGreater(field(layer, "r_gs")["mean"], 0)
                self.assertEqual(field(layer, "r_gs")["n"], 1)
        human = c.cli("compare", eid).stdout
        self.assertIn("BASELINE".lower(), human.lower())
        # A step that was probed, and one that was not: NOT_FOUND listing the probed steps.
        self.assertEqual(int(field(field(c.cli_json("compare", eid, "--step", "10"), "arms")[0], "step")), 10)
        r = c.cli("compare", eid, "--step", "7", check=False)
        self.assertNotEqual(r.returncode, 0, r.stdout)
        self.assertIn("NOT_FOUND", r.stderr)
        self.assertIn("was probed at step 7; probed steps: 1, 5, 10, 15, 20, 25, 30", r.stderr)
        # export: every step and every probe of every run.
        out = os.path.join(c.dir, "export.jsonl")
        c.cli("export", eid, "--format", "jsonl", "--out", out)
        with open(out) as f:
            lines = [json.loads(l) for l in f if l.strip()]
        self.assertGreaterEqual(len(lines), 2 * (30 + len(want_probes)))
        # The same export twice gives the same bytes (maps in a fixed order), so exports diff.
        again = os.path.join(c.dir, "export-again.jsonl")
        c.cli("export", eid, "--format", "jsonl", "--out", again)
        self.assertTrue(filecmp.cmp(out, again, shallow=False), "two exports of the same data differ")
        csv_out = os.path.join(c.dir, "export.csv")
        c.cli("export", eid, "--format", "csv", "--out", csv_out)
        self.assertTrue(os.path.getsize(csv_out) > 0)
        # The export reads a page at a time: GetRunMetrics with max_bytes answers pages cut
        # at step boundaries, each within the budget (one item more only when it alone is
        # larger), whose concatenation is the whole run.
        pb = harness.python_stubs()
        channel = grpc.insecure_channel(c.address)
        try:
            call = channel.unary_unary("/sinkscope.v1.ExperimentService/GetRunMetrics",
                                       request_serializer=lambda m: m.SerializeToString(),
                                       response_deserializer=pb.GetRunMetricsResponse.FromString)
            run_id = f"{eid}-vscale-s0"
            whole = call(pb.GetRunMetricsRequest(run_id=run_id), timeout=30)
            self.assertEqual(len(whole.steps), 30)
            self.assertEqual([p.step for p in whole.probes], want_probes)
            budget = 2 * max(p.ByteSize() for p in whole.probes)
            for only in ("steps_only", "probes_only"):
                steps, probes, pages, start = [], [], 0, 0
                while True:
                    page = call(pb.GetRunMetricsRequest(run_id=run_id, from_step=start, max_bytes=budget,
                                                        **{only: True}), timeout=30)
                    pages += 1
                    items = list(page.steps) + list(page.probes)
                    self.assertTrue(items, f"page {pages} from step {start} is empty")
                    self.assertTrue(all(i.step >= start for i in items))
                    if len(items) > 1:
                        self.assertLessEqual(sum(i.ByteSize() for i in items), budget)
                    if page.next_from_step:
                        self.assertTrue(all(i.step < page.next_from_step for i in items))
                        self.assertGreater(page.next_from_step, start)
                    steps += list(page.steps)
                    probes += list(page.probes)
                    if not page.next_from_step:
                        break
                    start = page.next_from_step
                if only == "steps_only":
                    self.assertEqual(steps, list(whole.steps))
                    self.assertEqual(probes, [])
                else:
                    self.assertEqual(probes, list(whole.probes))
                    self.assertEqual(steps, [])
                    self.assertGreater(pages, 2, "the probe reports took one page: the budget cut nothing")
            with self.assertRaises(grpc.RpcError) as raised:
                call(pb.GetRunMetricsRequest(run_id=run_id, steps_only=True, probes_only=True), timeout=30)
            self.assertEqual(raised.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        finally:
            channel.close()

    # --- a real Prometheus scrapes the coordinator -------------------------------------
    def test_2_prometheus_scrapes_probe_series(self):
        c = self.cluster
        eid = type(self).experiment_id
        self.assertIsNotNone(eid, "test_1 must run first")
        prom_dir = tempfile.mkdtemp(prefix="prom-", dir=c.dir)
        prom, port = harness.start_prometheus(prom_dir, f"""global:
  scrape_interval: 1s
scrape_configs:
  - job_name: sinkscope
    static_configs:
      - targets: ['127.0.0.1:{c.metrics_port}']
""")
        try:
            run_id = f"{eid}-vscale-s0"
            query = f'sinkscope_probe_gradient_sink_ratio{{run="{run_id}",layer="1"}}'

            def result():
                try:
                    r = harness.prometheus_query(port, query)
                except Exception:
                    return None
                return r["data"]["result"] if r.get("status") == "success" and r["data"]["result"] else None

            series = wait_for(result, 120, "Prometheus to scrape the probe series")
            self.assertEqual(len(series), 1)
            labels = series[0]["metric"]
            self.assertEqual(labels["experiment"], eid)
            self.assertEqual(labels["arm"], "VSCALE")
            self.assertEqual(labels["seed"], "0")
            self.assertEqual(labels["layer"], "1")
            # The value is the latest stored probe's R_GS of layer 1.
            pb = harness.python_stubs()
            (blob,) = c.sql("SELECT report FROM probe_reports WHERE run_id = ? ORDER BY step DESC LIMIT 1", run_id)[0]
            from sinkscope.v1 import metrics_pb2
            report = metrics_pb2.ProbeReport.FromString(blob)
            self.assertAlmostEqual(float(series[0]["value"][1]), report.layers[1].r_gs, places=6)
            theta = harness.prometheus_query(port, f'sinkscope_probe_vscale_theta{{run="{run_id}"}}')
            self.assertEqual(len(theta["data"]["result"]), 2)  # 2 layers × 1 KV head
        finally:
            prom.stop()

    # --- a client that is not ours -------------------------------------------------------
    def test_3_python_grpc_client_and_error_codes(self):
        c = self.cluster
        pb = harness.python_stubs()
        from sinkscope.v1 import experiment_pb2
        channel = grpc.insecure_channel(c.address)
        svc = "/sinkscope.v1.ExperimentService/"

        def call(method, request, response_type):
            return channel.unary_unary(svc + method, request_serializer=lambda m: m.SerializeToString(),
                                       response_deserializer=response_type.FromString)(request, timeout=10)

        listed = call("ListExperiments", pb.ListExperimentsRequest(), pb.ListExperimentsResponse)
        self.assertIn(type(self).experiment_id, [e.experiment_id for e in listed.experiments])
        got = call("GetExperiment", pb.GetExperimentRequest(experiment_id=type(self).experiment_id),
                   pb.ExperimentSummary)
        self.assertEqual(got.state, pb.COMPLETED)
        self.assertEqual(got.spec.model.d_model, 32)
        with self.assertRaises(grpc.RpcError) as e:
            call("GetExperiment", pb.GetExperimentRequest(experiment_id="nope-1"), pb.ExperimentSummary)
        self.assertEqual(e.exception.code(), grpc.StatusCode.NOT_FOUND)
        bad = experiment_pb2.Experiment(name="bad")
        bad.model.heads = 4
        bad.model.kv_heads = 3
        bad.data.text.paths.append(self.corpus)
        with self.assertRaises(grpc.RpcError) as e:
            call("SubmitExperiment", pb.SubmitExperimentRequest(experiment=bad), pb.SubmitExperimentResponse)
        self.assertEqual(e.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("model.kv_heads", e.exception.details())
        with self.assertRaises(grpc.RpcError) as e:
            call("CancelExperiment", pb.CancelExperimentRequest(experiment_id=type(self).experiment_id),
                 pb.ExperimentSummary)
        self.assertEqual(e.exception.code(), grpc.StatusCode.FAILED_PRECONDITION)
        # The standard health service answers SERVING (HealthCheckResponse.status = 1).
        health = channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=lambda b: b,
                                     response_deserializer=lambda b: b)(b"", timeout=5)
        self.assertEqual(health, b"\x08\x01")
        # Each of the coordinator's services by name too; Watch answers the status at once
        # and SERVICE_UNKNOWN (3) for a name the server does not serve.
        def named(name):
            return bytes([0x0A, len(name)]) + name.encode()
        for name in ("sinkscope.v1.ExperimentService", "sinkscope.v1.WorkerService"):
            self.assertEqual(channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=lambda b: b,
                                                 response_deserializer=lambda b: b)(named(name), timeout=5), b"\x08\x01")
        with self.assertRaises(grpc.RpcError) as e:
            channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=lambda b: b,
                                response_deserializer=lambda b: b)(named("no.such.Service"), timeout=5)
        self.assertEqual(e.exception.code(), grpc.StatusCode.NOT_FOUND)
        for request, first in ((b"", b"\x08\x01"), (named("no.such.Service"), b"\x08\x03")):
            watch = channel.unary_stream("/grpc.health.v1.Health/Watch", request_serializer=lambda b: b,
                                         response_deserializer=lambda b: b)(request, timeout=20)
            self.assertEqual(next(watch), first)
            watch.cancel()
        channel.close()

    def test_4_bad_experiment_file_names_the_field(self):
        c = self.cluster
        path = os.path.join(c.dir, "bad.yaml")
        with open(path, "w") as f:
            f.write("name: bad\nmodel:\n  layers: 2\n  kv_hedas: 1\n")
        r = c.cli("submit", path, check=False)
        self.assertEqual(r.returncode, 2, r.stdout + r.stderr)
        self.assertIn("bad.yaml:4", r.stderr)
        self.assertIn("model.kv_hedas", r.stderr)
        self.assertIn("unknown field", r.stderr)
        r = c.cli("status", "no-such-experiment-9", check=False)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("NOT_FOUND", r.stderr)

    # --- SIGKILL of a worker mid-run --------------------------------------------------------
    def test_5_sigkill_worker_restarts_from_checkpoint_without_losing_reports(self):
        c = self.cluster
        # The victim is the only worker when the run is submitted and stalls after step 30
        # (its checkpoint written), heartbeating, so the kill lands at a known step however
        # fast the machine trains; the rescuer starts only then.
        c.workers["worker-a"].stop()
        stall = 30
        victim = "worker-victim"
        c.start_worker(victim, extra_args=("--fault-stall-after-step", str(stall)))
        steps = 80
        path, spec = self.write_experiment("kill", steps=steps, probe_every=10, checkpoint_every=10,
                                           arms=("vscale",), d_model=64)
        eid = self.submit(path)
        run_id = f"{eid}-vscale-s0"

        def stalled():
            run = runs_of(c.status(eid))[0]
            return run.get("state") == "RUNNING" and field(run, "worker_id") == victim and \
                int(field(run, "step") or 0) == stall

        wait_for(stalled, 300, f"the run to stall at step {stall} on {victim}")
        c.start_worker("worker-b")
        c.workers[victim].kill(signal.SIGKILL)
        status = c.wait_state(eid, {"COMPLETED", "FAILED_RUNS"}, timeout=600)
        self.assertEqual(status["state"], "COMPLETED", c.logs())
        run = runs_of(status)[0]
        self.assertEqual(int(field(run, "attempt")), 2)
        self.assertNotEqual(field(run, "worker_id"), victim)
        attempts = c.sql("SELECT attempt, worker_id, outcome, start_step FROM attempts WHERE run_id = ? "
                         "ORDER BY attempt", run_id)
        self.assertEqual(len(attempts), 2)
        self.assertEqual(attempts[0][1], victim)
        self.assertEqual(attempts[0][2], "lease lapsed")
        self.assertEqual(attempts[1][3], stall, "the second attempt resumed from the step-30 checkpoint")
        # Every probe report stored exactly once, none missing.
        probes = [s for (s,) in c.sql("SELECT step FROM probe_reports WHERE run_id = ? ORDER BY step", run_id)]
        self.assertEqual(probes, harness.expected_probe_steps(steps, 10))
        steps_stored = [s for (s,) in c.sql("SELECT step FROM step_metrics WHERE run_id = ? ORDER BY step", run_id)]
        self.assertEqual(steps_stored, list(range(1, steps + 1)))
        # The restarted run ends with the same weights as an uninterrupted local run.
        local = os.path.join(c.dir, "local-kill")
        subprocess.run([harness.binary("sinkscope-train"), path, "--out", local], check=True,
                       capture_output=True, timeout=600)
        self.assertTrue(filecmp.cmp(os.path.join(local, "vscale-s0", "hf", "model.safetensors"),
                                    os.path.join(c.dir, "checkpoints", eid, run_id, "hf", "model.safetensors"),
                                    shallow=False), "final weights differ from the uninterrupted run")

    # --- the paper's figures from the store ----------------------------------------------------
    def read_figure(self, folder, name):
        """A figure's data file as rows of dicts; the PNG and SVG beside it exist and are images."""
        with open(os.path.join(folder, name + ".png"), "rb") as f:
            self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n", name)
        self.assertGreater(os.path.getsize(os.path.join(folder, name + ".png")), 3000, name)
        with open(os.path.join(folder, name + ".svg")) as f:
            self.assertIn("<svg", f.read(4096), name)
        with open(os.path.join(folder, name + ".tsv")) as f:
            lines = [l.rstrip("\n") for l in f if not l.startswith("#")]
        header = lines[0].split("\t")
        self.assertEqual(header, ["panel", "series", "tag", "x", "y", "err", "z"])
        rows = [dict(zip(header, l.split("\t"))) for l in lines[1:]]
        self.assertTrue(rows, name)
        return rows

    def assertClose(self, got, want, what):
        self.assertTrue(abs(float(got) - want) <= 1e-12 * max(1.0, abs(want)), f"{what}: {got} vs {want}")

    def export_lines(self, eid):
        out = os.path.join(self.cluster.dir, f"report-{eid}.jsonl")
        self.cluster.cli("export", eid, "--format", "jsonl", "--out", out)
        with open(out) as f:
            return [json.loads(l) for l in f if l.strip()]

    def test_6_report_draws_the_stored_data(self):
        c = self.cluster
        eid = type(self).experiment_id
        self.assertIsNotNone(eid, "test_1 must run first")
        folder = os.path.join(c.dir, "report")
        r = c.cli("report", eid, "--out", folder)
        self.assertIn(f"report of {eid} at step 30", r.stdout)
        self.assertIn(os.path.join(folder, "index.html"), r.stdout)
        lines = self.export_lines(eid)
        probes = {(l["arm"].lower(), int(l["probe"]["step"])): l["probe"] for l in lines if "probe" in l}
        steps = {(l["arm"].lower(), int(l["step"]["step"])): l["step"] for l in lines if "step" in l}
        with open(os.path.join(folder, "index.html")) as f:
            html = f.read()
        for name in ("fig01_gradient_sinks", "fig02_path_profiles", "fig03_reshaping", "fig07_sink_rate_and_norms",
                     "fig12_value_norms", "fig13_theta", "training_curves"):
            self.assertIn(f'src="{name}.png"', html)
        self.assertIn("&quot;d_model&quot;: 32", html)  # the settings are shown
        s = 0
        # Figure 1: every token's N_t at x̃ of every layer, at step 30.
        rows = self.read_figure(folder, "fig01_gradient_sinks")
        self.assertEqual(len(rows), 2 * 2 * 16)  # arms × layers × P
        for row in rows:
            t = int(row["tag"].split("=")[1])
            layer = probes[(row["panel"], 30)]["layers"][int(float(row["x"]))]
            self.assertClose(row["y"], layer["grad_profile"]["xn"]["values"][t], "fig01")
            self.assertEqual(row["series"].startswith("token s"), t == s)
        # Figure 2: q, k, v profiles of layer 1 (layers / 2) at every probe step.
        rows = self.read_figure(folder, "fig02_path_profiles")
        self.assertEqual(len(rows), 2 * 3 * len(harness.expected_probe_steps(30, 5)) * 16)
        for i, row in enumerate(rows):
            arm, site = row["panel"].split("/")
            step = int(row["tag"].split()[1])
            self.assertClose(row["y"], probes[(arm, step)]["layers"][1]["grad_profile"][site]["values"][int(float(row["x"]))],
                             "fig02")
        # Figure 3: eq. (4) against the residual norms, tokens < 16 of each layer.
        rows = self.read_figure(folder, "fig03_reshaping")
        self.assertEqual(len(rows), 2 * 6 * 2 * 16)
        for row in rows:
            arm, which = row["panel"].split("/")
            branch, ratio = which.split("_")
            layer_text, t_text = row["tag"].split(", ")
            layer = probes[(arm, 30)]["layers"][int(layer_text.split()[1])]
            t = int(t_text.split("=")[1])
            norm = "h_in" if branch == "attn" else "h_half"
            self.assertClose(row["x"], layer["norms"][norm]["values"][t], "fig03 x")
            self.assertClose(row["y"], layer[f"{branch}_{ratio.lower()}"][t], "fig03 y")
        # Figure 7: one seed, so the mean is the stored value and there is no spread.
        rows = self.read_figure(folder, "fig07_sink_rate_and_norms")
        for row in rows:
            layer = probes[(row["series"], 30)]["layers"][int(float(row["x"]))]
            want = layer.get("sink_rate", 0.0) if row["panel"] == "sink_rate" else layer["norm_ratio"][row["panel"]]
            self.assertClose(row["y"], want, "fig07")
            self.assertEqual(row["err"], "")
        # Figure 12: ‖v‖ of token s against tokens 1…15 other than s, layer 1, every probe.
        rows = self.read_figure(folder, "fig12_value_norms")
        for row in rows:
            v = probes[(row["panel"], int(float(row["x"])))]["layers"][1]["norms"]["v"]["values"]
            ref = [v[t] for t in range(1, 16) if t != s]
            want = {"token s": v[s], "mean of tokens 1-15": sum(ref) / len(ref), "max of tokens 1-15": max(ref)}
            self.assertClose(row["y"], want[row["series"]], "fig12 " + row["series"])
        # Figure 13: θ of the V-scale arm only.
        rows = self.read_figure(folder, "fig13_theta")
        self.assertEqual({r["panel"] for r in rows}, {"vscale"})
        self.assertEqual(len(rows), 2)  # 2 layers × 1 KV head
        for row in rows:
            self.assertClose(row["z"], probes[("vscale", 30)]["layers"][int(row["y"])]["theta"][int(row["x"])], "fig13")
        # Training curves: the stored loss of every step.
        rows = self.read_figure(folder, "training_curves")
        for row in rows:
            arm = row["series"].split()[0]
            step = steps[(arm, int(float(row["x"])))]
            self.assertClose(row["y"], step["val_loss"] if row["panel"] == "val_loss" else step["loss"], "curves")
        self.assertEqual(len([r for r in rows if r["panel"] == "loss"]), 2 * 30)

        # Names that do not exist are errors naming them; nothing is written for them.
        r = c.cli("report", eid, "--arms", "baseline,nope", "--out", os.path.join(c.dir, "r2"), check=False)
        self.assertEqual(r.returncode, 1, r.stdout)
        self.assertIn(f"NOT_FOUND: experiment {eid} has no arm nope (its arms: baseline, vscale)", r.stderr)
        self.assertFalse(os.path.exists(os.path.join(c.dir, "r2")))
        r = c.cli("report", eid, "--step", "7", check=False)
        self.assertIn(f"run {eid}-baseline-s0 was not probed at step 7; probed steps: 1, 5, 10, 15, 20, 25, 30",
                      r.stderr)
        r = c.cli("report", eid, "--layer", "2", check=False)
        self.assertIn("--layer 2 is out of range: the model has 2 layers", r.stderr)
        r = c.cli("report", "no-such-experiment-9", check=False)
        self.assertIn("NOT_FOUND", r.stderr)
        # One arm at an earlier step: only its panels, and no θ figure for the baseline.
        solo = os.path.join(c.dir, "report-solo")
        c.cli("report", eid, "--arms", "baseline", "--step", "10", "--out", solo)
        self.assertEqual({r["panel"] for r in self.read_figure(solo, "fig01_gradient_sinks")}, {"baseline"})
        self.assertFalse(os.path.exists(os.path.join(solo, "fig13_theta.png")))
        with open(os.path.join(solo, "index.html")) as f:
            self.assertIn("no V-scale arm is shown", f.read())

    def test_7_report_over_seeds_and_without_probes(self):
        c = self.cluster
        # Two seeds: Figure 7 and the curves are the mean ± sample std over them.
        path, _ = self.write_experiment("seeds", steps=4, probe_every=2, arms=("vscale",), seeds=(0, 1))
        eid = self.submit(path)
        status = c.wait_state(eid, {"COMPLETED", "FAILED_RUNS"}, timeout=600)
        self.assertEqual(status["state"], "COMPLETED", c.logs())
        folder = os.path.join(c.dir, "report-seeds")
        c.cli("report", eid, "--out", folder)
        lines = self.export_lines(eid)
        probes = {(l["seed"], int(l["probe"]["step"])): l["probe"] for l in lines if "probe" in l}
        for row in self.read_figure(folder, "fig07_sink_rate_and_norms"):
            if row["panel"] == "sink_rate":
                continue
            vals = [probes[(seed, 4)]["layers"][int(float(row["x"]))]["norm_ratio"][row["panel"]] for seed in ("0", "1")]
            mean = sum(vals) / 2
            std = (sum((v - mean) ** 2 for v in vals) / 1) ** 0.5
            self.assertClose(row["y"], mean, "fig07 mean")
            self.assertClose(row["err"], std, "fig07 std")
            self.assertEqual(row["tag"], "n=2")
        # No probe report at all: the report names the run.
        path, _ = self.write_experiment("noprobe", steps=2, probe_every=0, arms=("baseline",))
        eid = self.submit(path)
        c.wait_state(eid, {"COMPLETED", "FAILED_RUNS"}, timeout=600)
        r = c.cli("report", eid, "--out", os.path.join(c.dir, "r3"), check=False)
        self.assertEqual(r.returncode, 1)
        self.assertIn(f"NOT_FOUND: run {eid}-baseline-s0 has no probe report (probe.every is 0", r.stderr)


    # --- a sweep: grid x arms x seeds, each run trained on its point ---------------------
    def test_8_sweep_trains_each_point_and_shows_it(self):
        c = self.cluster
        path, spec = self.write_experiment("sweep", steps=6, probe_every=3, arms=("baseline",))
        spec["train"]["warmup_steps"] = 0
        spec["sweep"] = {"train.lr": [0.002, 0.01], "data.bos": [False, True]}
        with open(path, "w") as f:
            json.dump(spec, f)
        eid = self.submit(path)
        status = c.wait_state(eid, {"COMPLETED", "FAILED_RUNS"}, timeout=600)
        self.assertEqual(status["state"], "COMPLETED", c.logs())
        runs = {field(r, "run_id"): r for r in runs_of(status)}
        want = {f"{eid}-p{k}-baseline-s0": label for k, label in enumerate(
            ["train.lr=0.002 data.bos=false", "train.lr=0.002 data.bos=true",
             "train.lr=0.01 data.bos=false", "train.lr=0.01 data.bos=true"])}
        self.assertEqual(sorted(runs), sorted(want))
        for run_id, label in want.items():
            self.assertEqual(field(runs[run_id], "point"), label)
        # Each run trained with its point's learning rate (step 1: no warm-up, the peak).
        lines = self.export_lines(eid)
        lr = {(l["run_id"]): float(field(l["step"], "learning_rate")) for l in lines
              if "step" in l and int(l["step"]["step"]) == 1}
        for run_id, label in want.items():
            self.assertAlmostEqual(lr[run_id], 0.002 if "lr=0.002" in label else 0.01, places=9, msg=run_id)
            self.assertTrue(all(l.get("point") == label for l in lines if l["run_id"] == run_id), run_id)
        # compare: one entry per point and arm, in the grid's order; --point picks one.
        arms = field(c.cli_json("compare", eid), "arms")
        self.assertEqual([field(a, "point") for a in arms], list(want.values()))
        one = field(c.cli_json("compare", eid, "--point", "p2"), "arms")
        self.assertEqual([field(a, "point") for a in one], ["train.lr=0.01 data.bos=false"])
        r = c.cli("compare", eid, "--point", "9", check=False)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("point 9: experiment " + eid + " has 4 points", r.stderr)
        human = c.cli("compare", eid).stdout
        self.assertIn("==== point p3: train.lr=0.01 data.bos=true", human)
        self.assertIn("points of the sweep:", c.cli("status", eid).stdout)
        # report: one per point, each in its own folder.
        folder = os.path.join(c.dir, "report-sweep")
        c.cli("report", eid, "--out", folder)
        for k in range(4):
            self.assertTrue(os.path.exists(os.path.join(folder, f"p{k}", "index.html")), k)
        # Prometheus: the point is a label of the run's series.
        import urllib.request
        text = urllib.request.urlopen(f"http://127.0.0.1:{c.metrics_port}/metrics", timeout=10).read().decode()
        self.assertIn('point="train.lr=0.01 data.bos=true"', text)
        # A bad axis is refused at submission naming it; nothing is queued.
        spec["sweep"] = {"train.lrr": [1]}
        bad = os.path.join(c.dir, "badsweep.json")
        with open(bad, "w") as f:
            json.dump(spec, f)
        r = c.cli("submit", bad, check=False)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn('sweep.train.lrr: unknown field "lrr"', r.stderr)


if __name__ == "__main__":
    unittest.main(verbosity=2)
