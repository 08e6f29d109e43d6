// `probe CHECKPOINT`: the diagnostic pass on a checkpoint (sinkscope's checkpoint.bin or
// a Hugging Face folder with config.json + model.safetensors), printed as a per-layer
// table or written as JSON. Shared by sinkscope-probe and the `sinkscope probe` CLI.
#pragma once

namespace sinkscope {

// argv[0] is the command's name; returns the process exit code.
int RunProbeCommand(int argc, char** argv);

}  // namespace sinkscope
