// ProbeReport ⇄ JSON. Per-layer keys follow tests/golden/README.md (R_GS,
// grad_profile, attn_bloat…, alpha, sink_rate, M, S, norms, massive), plus the fields
// the golden file does not carry (both reduce modes, norm ratios, θ and C, positions).
#pragma once

#include <nlohmann/json.hpp>

#include "engine/probes.h"

namespace sinkscope {

nlohmann::json ProbeReportToJson(const ProbeReport& report);

// A per-layer table for terminals: R_GS, sink rate, token-s norm ratios, top-1/median, θ.
std::string ProbeReportTable(const ProbeReport& report);

}  // namespace sinkscope
