// sinkscope-probe: the diagnostic pass on a checkpoint (see worker/probe_command.h).
#include "worker/probe_command.h"

int main(int argc, char** argv) { return sinkscope::RunProbeCommand(argc, argv); }
