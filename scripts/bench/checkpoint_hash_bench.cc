// sinkscope-bench-checkpoint-hash: what the checkpoint checksum costs per save and per
// load. Format 1 hashed with FNV-1a, a byte at a time (a multiply each, in a chain the
// CPU cannot overlap); format 2 hashes with XXH3-64 (xxHash, Debian's libxxhash), which
// reads 16 or 32 bytes a step. Both run over the same buffer of random float32 values
// (what a checkpoint's payload is); the best of --repeats passes is kept, and the time
// for a 12 GB checkpoint (the 1B config's parameters and AdamW moments: 3 × 4 B × ~1B)
// is extrapolated from it.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "base/flags.h"
#include "training/checkpoint.h"

namespace {

struct Timing {
  double seconds = 1e30;
  uint64_t sum = 0;
};

Timing Time(uint32_t version, const std::vector<char>& buffer, int repeats) {
  Timing t;
  for (int r = 0; r < repeats; ++r) {
    const auto start = std::chrono::steady_clock::now();
    t.sum = sinkscope::CheckpointChecksum(version, buffer.data(), buffer.size());
    t.seconds = std::min(t.seconds, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  return t;
}

}  // namespace

int main(int argc, char** argv) {
  namespace flags = sinkscope::flags;
  double gib = 1.0, extrapolate_gb = 12.0;
  int repeats = 3;
  bool json = false;
  CLI::App app("Throughput of the checkpoint checksums: format 1's FNV-1a and format 2's XXH3-64", argv[0]);
  app.add_option("--gib", gib, "GiB hashed per pass")->check(flags::Number(1.0 / 1024, 64))->default_val(1.0);
  app.add_option("--repeats", repeats, "passes per checksum (the best kept)")
      ->check(flags::Integer(1, 100))
      ->default_val(3);
  app.add_option("--extrapolate-gb", extrapolate_gb, "checkpoint size the seconds are given for, GB")
      ->check(flags::Number(0.001, 1e6))
      ->default_val(12.0);
  app.add_flag("--json", json, "one JSON object on stdout instead of the table");
  if (int exit = flags::Parse(app, argc, argv); exit >= 0) return exit;
  std::vector<char> buffer(static_cast<size_t>(gib * (1 << 30)) / 4 * 4);
  std::mt19937 rng(1);
  std::normal_distribution<float> weight(0.0f, 0.02f);
  for (size_t i = 0; i < buffer.size(); i += 4) {
    const float w = weight(rng);
    std::memcpy(buffer.data() + i, &w, 4);
  }
  nlohmann::json out = {{"bytes", buffer.size()}, {"extrapolated_bytes", extrapolate_gb * 1e9}};
  if (!json) std::printf("%-26s %10s %14s %22s\n", "checksum", "GB/s", "s per GiB", "s per 12 GB checkpoint");
  for (const auto& [version, name] : {std::pair{1u, "format 1: FNV-1a"}, std::pair{2u, "format 2: XXH3-64"}}) {
    const Timing t = Time(version, buffer, repeats);
    const double gbps = buffer.size() / t.seconds / 1e9;
    out[version == 1 ? "fnv1a" : "xxh3"] = {{"gb_per_s", gbps},
                                            {"seconds", t.seconds},
                                            {"extrapolated_seconds", extrapolate_gb / gbps},
                                            {"sum", t.sum}};
    if (!json) {
      std::printf("%-26s %10.2f %14.3f %22.2f\n", name, gbps, t.seconds * (1 << 30) / buffer.size(),
                  extrapolate_gb / gbps);
    }
  }
  if (json) std::printf("%s\n", out.dump().c_str());
  return 0;
}
