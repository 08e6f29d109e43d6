"""The dependency rule of docs/design/ARCHITECTURE.md, checked on the tree and on what the
build produced:

1. every project #include of a folder is of a folder below it (or of itself);
2. base, data, engine and training (and the tools built from them) compile and link with
   neither gRPC, protobuf, Abseil, yaml-cpp nor SQLite: every header their translation
   units read (g++ -MM with their real flags) is outside those libraries, and their link
   lines name none of them;
3. sinkscope-coordinator and the sinkscope CLI link no BLAS, OpenMP, CUDA or engine code:
   neither their ELF NEEDED entries nor their symbols; sinkscope-worker, which must have
   them, is the positive control that shows the check can fail.
"""
import json
import os
import re
import shlex
import subprocess
import sys
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.environ.get("SINKSCOPE_BUILD_DIR", os.path.join(ROOT, "build"))

# Folder → the project folders its sources may include (its own always). engine/config.h
# and engine/schedule.h are the model-config target: plain settings the schema checks.
CONFIG = {"engine/config.h", "engine/schedule.h"}
ALLOWED = {
    "base": set(),
    "data": {"base"},
    "engine": {"base"},
    "training": {"base", "data", "engine"},
    "schema": {"base", "data", "proto"} | CONFIG,
    "runspec": {"base", "data", "engine", "training", "proto", "schema"},
    "server": {"base", "proto", "schema"} | CONFIG,
    "client": {"base", "proto", "schema"} | CONFIG,
    "worker": {"base", "data", "engine", "training", "proto", "schema", "runspec"},
    "tools": {"base", "data", "engine", "training", "proto", "schema", "runspec"},
}
# Tools that must stay free of the service (sinkscope-train reads experiment files).
SERVICE_FREE_FOLDERS = ("base", "data", "engine", "training")
SERVICE_FREE_BINARIES = ("tools/sinkscope-probe", "tools/sinkscope-make-shards", "scripts/bench/sinkscope-bench-cpu")
SERVICE_LIBS = re.compile(r"grpc|protobuf|absl|yaml-cpp|sqlite|prometheus", re.I)
ENGINE_LIBS = re.compile(r"openblas|blas|gomp|omp|cudart|cublas|cudnn|nccl|gloo", re.I)
# Symbols of the engine proper (not its config arithmetic), BLAS and OpenMP.
ENGINE_SYMBOLS = re.compile(
    r"sinkscope::Model::|sinkscope::Backend::|CpuBackend|sinkscope::ProbeCollector|sinkscope::AdamWStep|"
    r"sinkscope::RunDiagnosticPass|\bcblas_|\bsgemm_|\bGOMP_|\bomp_get_"
)
INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)


def project_sources(folder):
    for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
        for f in files:
            if f.endswith((".h", ".cc", ".cu", ".cuh")):
                yield os.path.join(dirpath, f)


class IncludeRule(unittest.TestCase):
    def test_each_folder_includes_only_folders_below_it(self):
        bad = []
        for folder, allowed in ALLOWED.items():
            for path in project_sources(folder):
                with open(path, encoding="utf-8") as f:
                    for inc in INCLUDE.findall(f.read()):
                        top = inc.split("/")[0]
                        if "/" not in inc or not os.path.isdir(os.path.join(ROOT, top)):
                            continue  # a system or generated header seen through -I
                        if top == folder or top in allowed or inc in allowed:
                            continue
                        bad.append(f"{os.path.relpath(path, ROOT)} includes {inc}")
        self.assertEqual(bad, [], "includes against the layers:\n" + "\n".join(bad))

    def test_every_source_folder_is_placed(self):
        # A new top-level folder of C++ sources must be given its place in the rule.
        unplaced = []
        skip = {"tests", "fuzz", "scripts", "build", "docs", "deploy", "docker", "examples", ".git", "proto"}
        for entry in sorted(os.listdir(ROOT)):
            full = os.path.join(ROOT, entry)
            if entry in skip or entry.startswith("build") or not os.path.isdir(full) or entry in ALLOWED:
                continue
            if any(True for _ in project_sources(entry)):
                unplaced.append(entry)
        self.assertEqual(unplaced, [], "C++ folders without a layer in tests/layers_test.py")


class ServiceFreeEngine(unittest.TestCase):
    def test_engine_headers_come_from_no_service_library(self):
        with open(os.path.join(BUILD, "compile_commands.json")) as f:
            commands = json.load(f)
        checked, bad = 0, []
        for c in commands:
            rel = os.path.relpath(c["file"], ROOT)
            if not rel.startswith(tuple(p + "/" for p in SERVICE_FREE_FOLDERS)):
                continue
            argv = shlex.split(c["command"]) if "command" in c else c["arguments"]
            # Keep the compiler, -I/-D/-std flags and the source; ask for the header list.
            keep = [argv[0]] + [a for a in argv[1:] if a.startswith(("-I", "-D", "-std", "-isystem"))]
            deps = ["-MM", "-MG"]
            if c["file"].endswith(".cu"):  # nvcc: includes in its options file, no -MG
                i = argv.index("--options-file") if "--options-file" in argv else -1
                keep += argv[i:i + 2] if i >= 0 else []
                deps = ["-MM"]
            out = subprocess.run(keep + deps + [c["file"]], cwd=c["directory"], capture_output=True, text=True)
            self.assertEqual(out.returncode, 0, out.stderr)
            headers = out.stdout.replace("\\\n", " ").split()[1:]
            checked += 1
            for h in headers:
                if SERVICE_LIBS.search(h) or "/proto/" in h or ".pb.h" in h:
                    bad.append(f"{rel} reads {h}")
        self.assertGreater(checked, 10, "no translation unit of the engine layers was found")
        self.assertEqual(bad, [], "\n".join(bad))

    def test_tools_link_no_service_library(self):
        for b in SERVICE_FREE_BINARIES:
            path = os.path.join(BUILD, b)
            needed = self.needed(path)
            self.assertEqual([n for n in needed if SERVICE_LIBS.search(n)], [], f"{b} links {needed}")

    @staticmethod
    def needed(path):
        out = subprocess.run(["readelf", "-d", path], capture_output=True, text=True, check=True).stdout
        return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


class NoEngineInServiceBinaries(unittest.TestCase):
    def engine_parts(self, rel):
        path = os.path.join(BUILD, rel)
        self.assertTrue(os.path.exists(path), f"{path} is not built")
        needed = [n for n in ServiceFreeEngine.needed(path) if ENGINE_LIBS.search(n)]
        syms = subprocess.run(["nm", "-C", path], capture_output=True, text=True, check=True).stdout
        symbols = sorted({m.group(0) for m in ENGINE_SYMBOLS.finditer(syms)})
        return needed, symbols

    def test_coordinator_and_cli_have_no_engine(self):
        for rel in ("server/sinkscope-coordinator", "client/sinkscope"):
            needed, symbols = self.engine_parts(rel)
            self.assertEqual(needed, [], f"{rel} links {needed}")
            self.assertEqual(symbols, [], f"{rel} holds engine symbols {symbols}")

    def test_the_check_sees_the_engine_where_it_is(self):
        needed, symbols = self.engine_parts("worker/sinkscope-worker")
        self.assertTrue(any("blas" in n for n in needed), needed)
        self.assertTrue(any("gomp" in n for n in needed), needed)
        self.assertIn("sinkscope::Model::", symbols)
        self.assertIn("CpuBackend", symbols)


if __name__ == "__main__":
    unittest.main(verbosity=2)
