"""Diagnostic probe jobs through the service: `sinkscope probe MODEL --text FILE` against a
real coordinator and worker runs the pass on the worker and stores the report like a
training probe; the report is the one `sinkscope probe --local` computes on this machine,
number for number; status, export and the store hold it; a model path that does not exist
is refused at submission naming the field, and a batch the text cannot fill fails the run
as DATA_ERROR naming the file. Run by ctest (service_probe_job)."""

import json
import math
import os
import shutil
import subprocess
import unittest

import harness
from harness import Cluster, wait_for, field


def close(a, b):
    return a == b or (math.isfinite(a) and math.isfinite(b) and abs(a - b) <= 1e-12 * max(abs(a), abs(b)))


class ProbeJobTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.cluster = Cluster(lease_seconds=3.0)
        cls.cluster.start_coordinator()
        cls.cluster.start_worker("worker-a")
        c = cls.cluster
        cls.corpus = harness.write_corpus(c.dir)
        spec = harness.tiny_experiment("to-probe", cls.corpus, steps=6, probe_every=0, arms=("vscale",))
        spec["model"]["context"] = 32
        path = os.path.join(c.dir, "to-probe.json")
        with open(path, "w") as f:
            json.dump(spec, f)
        subprocess.run([harness.binary("sinkscope-train"), path, "--out", os.path.join(c.dir, "trained")], check=True,
                       capture_output=True, timeout=600)
        cls.model = os.path.join(c.dir, "trained", "vscale-s0", "hf")
        wait_for(lambda: "event=worker_registered" in c.coordinator.output(), 60, "the worker")

    @classmethod
    def tearDownClass(cls):
        if os.environ.get("SINKSCOPE_KEEP_LOGS"):
            print(cls.cluster.logs())
        cls.cluster.close()
        shutil.rmtree(cls.cluster.dir, ignore_errors=True)

    def probe(self, *args, check=True):
        return self.cluster.cli("--json", "probe", *args, check=check, timeout=300)

    def test_1_the_service_report_is_the_local_one(self):
        args = (self.model, "--text", self.corpus, "--batch", "4", "--seq", "32", "--micro-batch", "2")
        service = self.probe(*args)
        local = self.probe("--local", *args)
        got, want = json.loads(service.stdout), json.loads(local.stdout)
        self.assertIn("submitted probe-", service.stderr)
        self.assertEqual(int(got["batch_sequences"]), 4)
        self.assertEqual(int(got["seq_len"]), 32)
        self.assertTrue(close(got["loss"], want["loss"]), (got["loss"], want["loss"]))
        self.assertTrue(close(got["r_gs_median"], want["R_GS_median"]))
        self.assertEqual(len(got["layers"]), len(want["layers"]))
        for g, w in zip(got["layers"], want["layers"]):
            for a, b in (("r_gs", "R_GS"), ("sink_rate", "sink_rate"), ("r_gs_norm_then_mean", "R_GS_norm_then_mean")):
                self.assertTrue(close(g[a], w[b]), (a, g[a], w[b]))
            for a, b in (("alpha", "alpha"), ("column_mass", "M"), ("column_second_moment", "S"), ("theta", "theta"),
                         ("attn_bloat", "attn_bloat"), ("mlp_compress", "mlp_compress")):
                self.assertEqual(len(g[a]), len(w[b]), a)
                for x, y in zip(g[a], w[b]):
                    self.assertTrue(close(x, y), (a, x, y))
            for site, series in w["grad_profile"].items():
                for x, y in zip(g["grad_profile"][site]["values"], series):
                    self.assertTrue(close(x, y), (site, x, y))
            for name, value in w["norm_ratio"].items():
                self.assertTrue(close(g["norm_ratio"][name], value), name)
            self.assertEqual(int(g["massive"]["top1_token"]), w["massive"]["top1_token"])
            self.assertTrue(close(g["massive"]["top3"][0], w["massive"]["top3"][0]))
        # Stored and shown like any probe: status, the store, export.
        eid = service.stderr.split("submitted ")[1].split()[0]
        status = self.cluster.status(eid)
        self.assertEqual(status["state"], "COMPLETED")
        run = status["runs"][0]
        self.assertEqual(int(field(run, "probe_reports") or 0), 1)
        run_id = field(run, "run_id")
        self.assertEqual(self.cluster.sql("SELECT step FROM probe_reports WHERE run_id = ?", run_id), [(0,)])
        export = self.cluster.cli("export", eid, "--format", "jsonl").stdout.splitlines()
        self.assertEqual(sum(1 for line in export if '"probe"' in line), 1)
        # The table form for people.
        table = self.cluster.cli("probe", *args).stdout
        self.assertIn("R_GS median", table)
        self.assertIn("sink rate", table)

    def test_2_bad_jobs_are_refused_or_fail_naming_why(self):
        r = self.probe(os.path.join(self.cluster.dir, "no-such-model"), "--text", self.corpus, check=False)
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertIn("diagnostic.model: no such file or folder", r.stderr)
        short = os.path.join(self.cluster.dir, "short.txt")
        with open(short, "w") as f:
            f.write("too short\n")
        r = self.probe(self.model, "--text", short, "--batch", "4", "--seq", "32", check=False)
        self.assertEqual(r.returncode, 5, r.stderr)
        self.assertIn("DATA_ERROR", r.stdout)
        self.assertIn("short.txt holds", r.stdout)
        r = self.probe(self.model, "--batch", "4", check=False)
        self.assertEqual(r.returncode, 2)
        self.assertIn("give exactly one of --tokens or --text", r.stderr)


if __name__ == "__main__":
    unittest.main(verbosity=2)
