// libFuzzer target: experiment-file parsing. Arbitrary bytes as YAML or JSON onto
// sinkscope.v1.Experiment, then defaults and every rule (paths not checked: the input
// must not make the fuzzer walk the file system). Nothing may crash, hang or leak; an
// input that parses and validates must survive a binary round trip unchanged, and
// validating twice must give the same answer.
#include <google/protobuf/stubs/logging.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "runspec/convert.h"
#include "schema/experiment.h"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  google::protobuf::SetLogHandler(nullptr);  // quiet
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size > (64 << 10)) return -1;  // experiment files are small; keep iterations fast
  const std::string text(reinterpret_cast<const char*>(data), size);
  auto parsed = sinkscope::ParseExperimentText(text, "fuzz.yaml");
  if (!parsed.ok()) {
    if (parsed.status().message().empty()) __builtin_trap();  // every error says what is wrong
    return 0;
  }
  sinkscope::v1::Experiment e = *parsed;
  sinkscope::ApplyDefaults(e);
  const sinkscope::Status first = sinkscope::ValidateExperiment(e, /*check_paths=*/false);
  sinkscope::ApplyDefaults(e);  // idempotent
  const sinkscope::Status second = sinkscope::ValidateExperiment(e, /*check_paths=*/false);
  if (first.ok() != second.ok() || first.message() != second.message()) __builtin_trap();
  if (!first.ok() && first.message().find(": ") == std::string::npos) __builtin_trap();  // "field: rule"
  if (first.ok()) {
    sinkscope::v1::Experiment back;
    if (!back.ParseFromString(e.SerializeAsString())) __builtin_trap();
    if (back.SerializeAsString() != e.SerializeAsString()) __builtin_trap();
    // What the worker derives from a valid experiment.
    for (int arm : e.arms()) {
      const sinkscope::TrainerOptions o =
          sinkscope::ToTrainerOptions(e, static_cast<sinkscope::v1::Arm>(arm), e.seeds(0), 1e9);
      if (o.model.layers <= 0 || o.micro_batch <= 0) __builtin_trap();
    }
    (void)sinkscope::ToDataSpec(e);
  }
  return 0;
}
