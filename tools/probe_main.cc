// sinkscope-probe: the diagnostic pass on a checkpoint (see training/probe_command.h).
#include "training/probe_command.h"

int main(int argc, char** argv) { return sinkscope::RunProbeCommand(argc, argv); }
