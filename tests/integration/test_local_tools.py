"""The local front ends as a user runs them: sinkscope-train killed with SIGKILL at any
moment and resumed leaves metrics.jsonl and probes.jsonl exactly as an uninterrupted run
writes them; bad option values and an unusable --out are clear errors; the summary's final
loss is the last step's; sinkscope-probe reports a checkpoint's step, reads checkpoints of
format 1, and refuses damaged checkpoints and Hugging Face folders by name."""

import json
import os
import random
import shutil
import signal
import struct
import subprocess
import tempfile
import time
import unittest

import harness

STEPS = 240
TIMING_FIELDS = ("tokens_per_second", "mfu", "mfu_reference_flops")  # differ between any two runs


def read_jsonl(path):
    """Every line must be one complete JSON record (json.loads fails on a torn line)."""
    with open(path) as f:
        text = f.read()
    assert text == "" or text.endswith("\n"), f"{path} ends in a partial line"
    return [json.loads(line) for line in text.splitlines()]


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


class LocalToolsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="sinkscope-local-")
        cls.train = harness.binary("sinkscope-train")
        cls.probe = harness.binary("sinkscope-probe")
        cls.corpus = harness.write_corpus(cls.dir)
        spec = harness.tiny_experiment("local", cls.corpus, steps=STEPS, probe_every=10, checkpoint_every=20,
                                       arms=("vscale",))
        spec["checkpoint"]["export_hf"] = False
        cls.spec = os.path.join(cls.dir, "local.yaml")
        with open(cls.spec, "w") as f:
            json.dump(spec, f)
        cls.reference = os.path.join(cls.dir, "reference")
        r = subprocess.run([cls.train, cls.spec, "--out", cls.reference, "--json"], capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stderr
        cls.summary = json.loads(r.stdout)
        run = os.path.join(cls.reference, "vscale-s0")
        cls.metrics = read_jsonl(os.path.join(run, "metrics.jsonl"))
        cls.probes = read_jsonl(os.path.join(run, "probes.jsonl"))

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.dir, ignore_errors=True)

    def run_train(self, *args, timeout=600):
        return subprocess.run([self.train, *args], capture_output=True, text=True, timeout=timeout)

    def start(self, out, resume):
        args = [self.train, self.spec, "--out", out] + (["--resume"] if resume else [])
        return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def assert_like_reference(self, out):
        run = os.path.join(out, "vscale-s0")
        metrics = read_jsonl(os.path.join(run, "metrics.jsonl"))
        probes = read_jsonl(os.path.join(run, "probes.jsonl"))
        self.assertEqual([m["step"] for m in metrics], list(range(1, STEPS + 1)))
        self.assertEqual([p["step"] for p in probes], harness.expected_probe_steps(STEPS, 10))
        self.assertEqual(without_timing(metrics), without_timing(self.metrics))
        self.assertEqual(probes, self.probes)
        leftovers = [n for n in os.listdir(run) if ".tmp." in n]
        self.assertEqual(leftovers, [], "temporary files left behind")

    def test_reference_is_complete(self):
        self.assertEqual([m["step"] for m in self.metrics], list(range(1, STEPS + 1)))
        self.assertEqual([p["step"] for p in self.probes], harness.expected_probe_steps(STEPS, 10))

    def kill_after_checkpoints(self, out, resume, checkpoints, delay=0.0):
        """Starts a run and SIGKILLs it `delay` seconds after it has committed `checkpoints`
        new checkpoints (0: `delay` seconds after the start)."""
        ckpt = os.path.join(out, "vscale-s0", "checkpoint.bin")
        p = self.start(out, resume)
        try:
            # The checkpoint is replaced by a rename: a new inode is a new checkpoint.
            def inode():
                try:
                    return os.stat(ckpt).st_ino
                except FileNotFoundError:
                    return None
            seen, last = 0, inode()
            while seen < checkpoints and p.poll() is None:
                ino = inode()
                if ino is not None and ino != last:
                    seen, last = seen + 1, ino
                time.sleep(0.0005)
            time.sleep(delay)
        finally:
            alive = p.poll() is None
            p.send_signal(signal.SIGKILL)
            p.wait()
        return alive  # False: the run ended before the kill, which then tested nothing

    def test_sigkill_right_after_a_checkpoint_then_resume(self):
        out = os.path.join(self.dir, "kill-after-checkpoint")
        self.assertTrue(self.kill_after_checkpoints(out, resume=False, checkpoints=2), "the run ended before the kill")
        self.assertTrue(self.kill_after_checkpoints(out, resume=True, checkpoints=2), "the run ended before the kill")
        # A stale temporary checkpoint of a process killed in the middle of a write.
        run = os.path.join(out, "vscale-s0")
        with open(os.path.join(run, "checkpoint.bin.tmp.999999.1"), "w") as f:
            f.write("partial")
        with open(os.path.join(run, "checkpoint.bin.bak"), "w") as f:
            f.write("not ours")
        r = self.run_train(self.spec, "--out", out, "--resume")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assert_like_reference(out)
        self.assertTrue(os.path.exists(os.path.join(run, "checkpoint.bin.bak")), "a file not ours was removed")

    def test_sigkill_at_random_moments_then_resume(self):
        rng = random.Random(20240611)
        live_kills = 0
        for trial in range(4):
            out = os.path.join(self.dir, f"kill-random-{trial}")
            for attempt in range(3):
                live_kills += self.kill_after_checkpoints(out, resume=attempt > 0, checkpoints=rng.randrange(4),
                                                          delay=rng.uniform(0, 0.05))
            r = self.run_train(self.spec, "--out", out, "--resume")
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assert_like_reference(out)
        self.assertGreater(live_kills, 0, "every run ended before its kill")

    def test_resume_of_a_finished_run_changes_nothing(self):
        out = os.path.join(self.dir, "finished")
        self.assertEqual(self.run_train(self.spec, "--out", out).returncode, 0)
        r = self.run_train(self.spec, "--out", out, "--resume", "--json")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assert_like_reference(out)
        run = json.loads(r.stdout)["runs"][0]
        self.assertEqual(run["steps"], STEPS)
        self.assertEqual(run["final_loss"], self.metrics[-1]["loss"])

    def test_the_benchmark_trains_the_quickstart_model(self):
        # One source for the model's fields: the benchmark's model (built without protobuf)
        # is examples/quickstart.yaml's as the schema reads it, field for field.
        bench = os.path.join(harness.build_dir(), "scripts", "bench", "sinkscope-bench-cpu")
        got = subprocess.run([bench, "--print-model"], capture_output=True, text=True, timeout=60, check=True)
        want = subprocess.run([self.train, os.path.join(harness.ROOT, "examples", "quickstart.yaml"), "--print-model"],
                              capture_output=True, text=True, timeout=60, check=True)
        self.assertEqual(json.loads(got.stdout), json.loads(want.stdout))

    def test_ranks_train_the_same_run(self):
        # --ranks 2: two Gloo ranks in one process train the same global batch; the loss
        # agrees to float rounding (the ranks' sums are added in another order).
        spec = harness.tiny_experiment("ranks", self.corpus, steps=6, probe_every=3, checkpoint_every=3,
                                       arms=("vscale",))
        spec["probe"]["batch"] = "HELD_OUT"
        path = os.path.join(self.dir, "ranks.yaml")
        with open(path, "w") as f:
            json.dump(spec, f)
        losses = {}
        for n in (1, 2):
            r = self.run_train(path, "--out", os.path.join(self.dir, f"ranks{n}"), "--ranks", str(n), "--json")
            self.assertEqual(r.returncode, 0, r.stderr)
            losses[n] = json.loads(r.stdout)["runs"][0]["final_loss"]
        self.assertAlmostEqual(losses[2], losses[1], delta=1e-6 * losses[1])
        for bad in ("0", "65", "two"):
            r = self.run_train(path, "--ranks", bad)
            self.assertEqual(r.returncode, 2, r.stderr)
            self.assertIn(f"--ranks: must be an integer in 1-64, got '{bad}'", r.stderr)

    def test_bf16_mode_trains_like_fp32(self):
        # --bf16: the CPU backend's bf16 mode; the loss follows fp32's to bf16 precision.
        spec = harness.tiny_experiment("bf16", self.corpus, steps=20, probe_every=10, checkpoint_every=10,
                                       arms=("vscale",))
        path = os.path.join(self.dir, "bf16.yaml")
        with open(path, "w") as f:
            json.dump(spec, f)
        runs = {}
        for mode in ("fp32", "bf16"):
            extra = ["--bf16"] if mode == "bf16" else []
            r = self.run_train(path, "--out", os.path.join(self.dir, mode), "--json", *extra)
            self.assertEqual(r.returncode, 0, r.stderr)
            runs[mode] = json.loads(r.stdout)
        self.assertEqual(runs["bf16"]["backend"], "cpu-bf16")
        self.assertEqual(runs["fp32"]["backend"], "cpu")
        fp32, bf16 = runs["fp32"]["runs"][0], runs["bf16"]["runs"][0]
        self.assertNotEqual(bf16["final_loss"], fp32["final_loss"])  # the rounding is real
        self.assertAlmostEqual(bf16["final_loss"], fp32["final_loss"], delta=0.05 * fp32["final_loss"])

    def test_final_loss_is_the_last_steps_loss(self):
        run = self.summary["runs"][0]
        self.assertEqual(run["final_loss"], self.metrics[-1]["loss"])
        self.assertEqual(run["first_loss"], self.metrics[0]["loss"])
        last10 = [m["loss"] for m in self.metrics[-10:]]
        self.assertAlmostEqual(run["mean_loss_last_10"], sum(last10) / 10, places=12)

    def test_unusable_out_folder_is_a_clear_error(self):
        a_file = os.path.join(self.dir, "a-file")
        with open(a_file, "w") as f:
            f.write("x")
        for out in ("/proc/nope", os.path.join(a_file, "sub")):
            r = self.run_train(self.spec, "--out", out)
            self.assertEqual(r.returncode, 2, r.stderr)
            self.assertIn(out, r.stderr)
            self.assertIn("cannot create", r.stderr)
            self.assertNotIn("terminate", r.stderr)

    def test_bad_numeric_options_are_usage_errors(self):
        for value in ("abc", "0", "-3", "1.5", "12x", "", "99999999999"):
            r = self.run_train(self.spec, "--steps", value, "--out", os.path.join(self.dir, "never"))
            self.assertEqual(r.returncode, 2, f"--steps {value!r}: {r.stderr}")
            self.assertIn(f"--steps: must be a positive integer, got '{value}'", r.stderr)
        r = self.run_train(self.spec, "--steps")
        self.assertEqual(r.returncode, 2)
        self.assertIn("--steps: 1 required INT missing", r.stderr)
        self.assertFalse(os.path.exists(os.path.join(self.dir, "never")))
        ckpt = os.path.join(self.reference, "vscale-s0", "checkpoint.bin")
        for option, value in (("--batch", "abc"), ("--batch", "0"), ("--seq", "-1"), ("--s", "x"), ("--eps", "nan"),
                              ("--ref-span", "3.5"), ("--profile-len", ""), ("--t-eps", "1e9")):
            r = subprocess.run([self.probe, ckpt, "--text", self.corpus, option, value], capture_output=True, text=True,
                               timeout=120)
            self.assertEqual(r.returncode, 2, f"{option} {value!r}: {r.stderr}")
            self.assertIn(option, r.stderr)
            self.assertIn(f"'{value}'", r.stderr)

    def test_probe_reports_the_checkpoints_step(self):
        ckpt = os.path.join(self.reference, "vscale-s0", "checkpoint.bin")
        r = subprocess.run([self.probe, ckpt, "--text", self.corpus, "--batch", "2", "--json"], capture_output=True,
                           text=True, timeout=120)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(json.loads(r.stdout)["step"], STEPS)
        r = subprocess.run([self.probe, ckpt, "--bogus"], capture_output=True, text=True, timeout=60)
        self.assertEqual(r.returncode, 2)
        self.assertIn("not expected: --bogus", r.stderr)

    def test_report_of_a_probe_file(self):
        """sinkscope report --probe draws one probe (here of a trained V-scale checkpoint) without a
        coordinator; the data behind each figure is the probe's, and a bad file is named."""
        ckpt = os.path.join(self.reference, "vscale-s0", "checkpoint.bin")
        r = subprocess.run([self.probe, ckpt, "--text", self.corpus, "--batch", "2", "--json"], capture_output=True,
                           text=True, timeout=120)
        self.assertEqual(r.returncode, 0, r.stderr)
        probe_file = os.path.join(self.dir, "trained.json")
        with open(probe_file, "w") as f:
            f.write(r.stdout)
        probe = json.loads(r.stdout)
        cli = harness.binary("sinkscope")
        out = os.path.join(self.dir, "probe-report")
        r = subprocess.run([cli, "report", "--probe", probe_file, "--out", out], capture_output=True, text=True,
                           timeout=120)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("report of trained at step 240", r.stdout)
        with open(os.path.join(out, "fig01_gradient_sinks.tsv")) as f:
            rows = [l.rstrip("\n").split("\t") for l in f if not l.startswith("#")][1:]
        self.assertEqual(len(rows), sum(len(l["grad_profile"]["xn"]) for l in probe["layers"]))
        for panel, series, tag, x, y, err, z in rows:
            self.assertEqual(panel, "trained")
            t = int(tag.split("=")[1])
            want = probe["layers"][int(float(x))]["grad_profile"]["xn"][t]
            self.assertLessEqual(abs(float(y) - want), 1e-12 * abs(want))
        with open(os.path.join(out, "fig13_theta.tsv")) as f:
            cells = [l.rstrip("\n").split("\t") for l in f if not l.startswith("#")][1:]
        for cell in cells:
            self.assertEqual(float(cell[6]), probe["layers"][int(cell[4])]["theta"][int(cell[3])])
        self.assertFalse(os.path.exists(os.path.join(out, "training_curves.png")))  # no steps in a probe
        with open(os.path.join(out, "index.html")) as f:
            self.assertIn("no training step is stored", f.read())
        # A file that is not a probe, and one missing a key: named, exit 2, nothing written.
        bad = os.path.join(self.dir, "bad.json")
        with open(bad, "w") as f:
            f.write("[1, 2]")
        r = subprocess.run([cli, "report", "--probe", bad, "--out", os.path.join(self.dir, "never")],
                           capture_output=True, text=True, timeout=60)
        self.assertEqual(r.returncode, 2)
        self.assertIn(f"{bad}: not a JSON object", r.stderr)
        del probe["layers"][1]["norms"]
        with open(bad, "w") as f:
            json.dump(probe, f)
        r = subprocess.run([cli, "report", "--probe", bad, "--out", os.path.join(self.dir, "never")],
                           capture_output=True, text=True, timeout=60)
        self.assertEqual(r.returncode, 2)
        self.assertIn(f"{bad}: layers[1].norms is missing", r.stderr)
        self.assertFalse(os.path.exists(os.path.join(self.dir, "never")))

    def test_report_of_a_train_dir(self):
        """sinkscope report --train-dir draws the runs sinkscope-train wrote, without a coordinator:
        Figure 7's sink rate, Figure 12's value norms over the probed steps and the loss curve are
        the files' numbers; a bad line and a misnamed run directory are named."""
        cli = harness.binary("sinkscope")
        out = os.path.join(self.dir, "train-report")
        r = subprocess.run([cli, "report", "--train-dir", self.reference, "--out", out], capture_output=True,
                           text=True, timeout=120)
        self.assertEqual(r.returncode, 0, r.stderr)

        def rows(name):
            with open(os.path.join(out, name + ".tsv")) as f:
                return [l.rstrip("\n").split("\t") for l in f if not l.startswith("#")][1:]

        last = self.probes[-1]
        sink = [row for row in rows("fig07_sink_rate_and_norms") if row[0] == "sink_rate"]
        self.assertEqual(len(sink), len(last["layers"]))
        for panel, series, tag, x, y, err, z in sink:
            self.assertEqual(float(y), last["layers"][int(float(x))]["sink_rate"])
        layer = len(last["layers"]) // 2
        fig12 = [row for row in rows("fig12_value_norms") if row[1].startswith("token s")]
        self.assertEqual([int(float(row[3])) for row in fig12], [p["step"] for p in self.probes])
        for row, p in zip(fig12, self.probes):
            want = p["layers"][layer]["norms"]["v"][0]
            self.assertLessEqual(abs(float(row[4]) - want), 1e-12 * abs(want))
        curve = [row for row in rows("training_curves") if row[0] == "loss"]
        self.assertEqual([float(row[4]) for row in curve], [m["loss"] for m in self.metrics])
        # A line that is not JSON: the file and line named, exit 2, nothing written.
        bad = os.path.join(self.dir, "bad-train", "vscale-s0")
        os.makedirs(bad)
        shutil.copy(os.path.join(self.reference, "vscale-s0", "metrics.jsonl"), bad)
        with open(os.path.join(bad, "probes.jsonl"), "w") as f:
            f.write(json.dumps(self.probes[0]) + "\n{not json\n")
        never = os.path.join(self.dir, "never-train")
        r = subprocess.run([cli, "report", "--train-dir", os.path.dirname(bad), "--out", never], capture_output=True,
                           text=True, timeout=60)
        self.assertEqual(r.returncode, 2)
        self.assertIn(os.path.join(bad, "probes.jsonl") + ":2: not a JSON object", r.stderr)
        os.rename(bad, os.path.join(self.dir, "bad-train", "someone"))
        r = subprocess.run([cli, "report", "--train-dir", os.path.dirname(bad), "--out", never], capture_output=True,
                           text=True, timeout=60)
        self.assertEqual(r.returncode, 2)
        self.assertIn("named [p<k>-]<arm>-s<seed>", r.stderr)
        self.assertFalse(os.path.exists(never))

    def restamped_v1(self, data):
        """The checkpoint `data` as format 1 wrote it: version 1 and FNV-1a (with format 1's offset
        basis, FNV's short of its last digit) over everything before the checksum."""
        data = bytearray(data)
        data[8:12] = struct.pack("<I", 1)
        h = 1469598103934665603
        for byte in data[:-8]:
            h = ((h ^ byte) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
        data[-8:] = struct.pack("<Q", h)
        return bytes(data)

    def test_checkpoints_of_format_one_load_and_non_finite_ones_are_refused(self):
        """A format-1 checkpoint (FNV-1a) probes as its format-2 original does; one whose weights
        hold a NaN is refused, exit non-zero, naming the tensor, by the probe and by a resumed run."""
        src = os.path.join(self.reference, "vscale-s0", "checkpoint.bin")
        with open(src, "rb") as f:
            data = f.read()
        self.assertEqual(struct.unpack("<I", data[8:12])[0], 2)
        v1 = os.path.join(self.dir, "format1.ckpt")
        with open(v1, "wb") as f:
            f.write(self.restamped_v1(data))
        args = ["--text", self.corpus, "--batch", "2", "--json"]
        a = subprocess.run([self.probe, src, *args], capture_output=True, text=True, timeout=120)
        b = subprocess.run([self.probe, v1, *args], capture_output=True, text=True, timeout=120)
        self.assertEqual(a.returncode, 0, a.stderr)
        self.assertEqual(b.returncode, 0, b.stderr)
        self.assertEqual({**json.loads(a.stdout), "checkpoint": ""}, {**json.loads(b.stdout), "checkpoint": ""})
        # A NaN as the embedding's element 3 (the embedding is the payload's first tensor).
        header_len = struct.unpack("<Q", data[16:24])[0]
        at = 24 + header_len + 4 * 3
        nan = bytearray(data)
        nan[at:at + 4] = struct.pack("<f", float("nan"))
        with open(v1, "wb") as f:
            f.write(self.restamped_v1(nan))
        r = subprocess.run([self.probe, v1, *args], capture_output=True, text=True, timeout=120)
        self.assertEqual(r.returncode, 2, r.stderr)
        self.assertIn("tensor model.embed_tokens.weight holds NaN at element 3", r.stderr)
        self.assertEqual(r.stdout, "")
        out = os.path.join(self.dir, "nan-resume")
        shutil.copytree(self.reference, out)
        shutil.copy(v1, os.path.join(out, "vscale-s0", "checkpoint.bin"))
        r = self.run_train(self.spec, "--out", out, "--resume")
        self.assertNotEqual(r.returncode, 0, r.stderr)
        self.assertIn("tensor model.embed_tokens.weight holds NaN at element 3", r.stderr)

    def write_hf_folder(self, name, config_edit=None, tensor_edit=None, header_edit=None):
        """A tiny Llama folder written here (F32 safetensors from the standard library): config.json
        and model.safetensors, each changed by the edits given."""
        folder = os.path.join(self.dir, "hf-" + name)
        os.makedirs(folder, exist_ok=True)
        d, layers, heads, kv, dh, ffn, vocab = 16, 1, 2, 1, 8, 32, 257
        config = {"model_type": "llama", "vocab_size": vocab, "hidden_size": d, "intermediate_size": ffn,
                  "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
                  "head_dim": dh, "max_position_embeddings": 32, "rms_norm_eps": 1e-5, "hidden_act": "silu",
                  "tie_word_embeddings": False}
        if config_edit:
            config_edit(config)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config, f)
        shapes = [("model.embed_tokens.weight", (vocab, d))]
        for l in range(layers):
            p = f"model.layers.{l}."
            shapes += [(p + "input_layernorm.weight", (d,)), (p + "self_attn.q_proj.weight", (heads * dh, d)),
                       (p + "self_attn.k_proj.weight", (kv * dh, d)), (p + "self_attn.v_proj.weight", (kv * dh, d)),
                       (p + "self_attn.o_proj.weight", (d, heads * dh)),
                       (p + "post_attention_layernorm.weight", (d,)), (p + "mlp.gate_proj.weight", (ffn, d)),
                       (p + "mlp.up_proj.weight", (ffn, d)), (p + "mlp.down_proj.weight", (d, ffn))]
        shapes += [("model.norm.weight", (d,)), ("lm_head.weight", (vocab, d))]
        rng = random.Random(7)
        tensors = {}
        for tname, shape in shapes:
            n = 1
            for s_ in shape:
                n *= s_
            tensors[tname] = [1.0] * n if len(shape) == 1 else [rng.gauss(0, 0.05) for _ in range(n)]
        if tensor_edit:
            tensor_edit(tensors)
        header, blob = {}, bytearray()
        for tname, shape in shapes:
            values = tensors[tname]
            header[tname] = {"dtype": "F32", "shape": list(shape), "data_offsets": [len(blob), len(blob) + 4 * len(values)]}
            blob += struct.pack(f"<{len(values)}f", *values)
        if header_edit:
            header_edit(header)
        h = json.dumps(header).encode()
        h += b" " * ((8 - (8 + len(h)) % 8) % 8)
        with open(os.path.join(folder, "model.safetensors"), "wb") as f:
            f.write(struct.pack("<Q", len(h)) + h + bytes(blob))
        return folder

    def test_probe_refuses_damaged_hugging_face_folders(self):
        """What a damaged or unusual folder used to probe with exit 0: refused with exit 2 naming what
        is wrong, or probed with a warning on stderr."""
        args = ["--text", self.corpus, "--batch", "2", "--seq", "16"]
        r = subprocess.run([self.probe, self.write_hf_folder("plain"), *args], capture_output=True, text=True,
                           timeout=120)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertNotIn("warning", r.stderr)
        k, v = "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight"

        def overlap(h):
            h[v]["data_offsets"] = h[k]["data_offsets"]

        def nan(t):
            t["model.layers.0.mlp.up_proj.weight"][5] = float("nan")

        def no_type(c):
            del c["model_type"]

        def window(c):
            c["model_type"] = "mistral"
            c["sliding_window"] = 8

        refused = {
            "overlap": (dict(header_edit=overlap), f"tensor {v}'s data_offsets ["),
            "nan": (dict(tensor_edit=nan), "tensor model.layers.0.mlp.up_proj.weight holds NaN at element 5"),
            "no-type": (dict(config_edit=no_type), "config.json: model_type is missing"),
            "window": (dict(config_edit=window), "the sequence length must be in [1, 8] (Mistral's sliding_window"),
        }
        for name, (edit, message) in refused.items():
            r = subprocess.run([self.probe, self.write_hf_folder(name, **edit), *args], capture_output=True,
                               text=True, timeout=120)
            self.assertEqual(r.returncode, 2, f"{name}: {r.stderr}")
            self.assertIn(message, r.stderr, name)
            self.assertEqual(r.stdout, "", name)

        def yarn(c):
            c["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}

        def tied(c):
            c["tie_word_embeddings"] = True

        warned = {
            "yarn": (dict(config_edit=yarn), "rope_scaling.factor = 4 differs from max_position_embeddings / "
                                             "original_max_position_embeddings = 32 / 16 = 2"),
            "tied": (dict(config_edit=tied), "tie_word_embeddings is true, so tensor lm_head.weight is ignored"),
        }
        for name, (edit, message) in warned.items():
            r = subprocess.run([self.probe, self.write_hf_folder(name, **edit), *args], capture_output=True,
                               text=True, timeout=120)
            self.assertEqual(r.returncode, 0, f"{name}: {r.stderr}")
            self.assertIn("warning: ", r.stderr, name)
            self.assertIn(message, r.stderr, name)

    def test_special_files_are_refused_before_reading(self):
        """A device, FIFO or folder where a file is expected is named and refused at once: reading
        /dev/zero as a checkpoint once grew to 24 GB."""
        fifo = os.path.join(self.dir, "fifo")
        if not os.path.exists(fifo):
            os.mkfifo(fifo)
        cli = harness.binary("sinkscope")
        for path in ("/dev/zero", fifo):
            for argv in ([self.probe, path, "--text", self.corpus], [cli, "report", "--probe", path],
                         [cli, "--coordinator", "127.0.0.1:1", "submit", path]):
                r = subprocess.run(argv, capture_output=True, text=True, timeout=20)
                self.assertEqual(r.returncode, 2, f"{argv}: {r.stderr}")
                self.assertIn(f"{path}: not a regular file", r.stderr, argv)


if __name__ == "__main__":
    unittest.main(verbosity=2)
