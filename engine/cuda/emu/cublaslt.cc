// The emulation's host stand-in for cuBLASLt: exactly the entry points the CUDA backend calls,
// with cuBLASLt's documented semantics (column-major layouts, ld, strided batches, transposes,
// fp32/TF32/bf16 numerics, the bias epilogue, the heuristic and its alignment contract) and the
// checks a real GPU would turn into a fault, a wrong result or an error status.
#include "engine/cuda/emu/runtime.h"

#include <cublasLt.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

// cublasLtHandle_t points to this struct, which the header leaves incomplete.
struct cublasLtContext {
  uint64_t magic;
};

namespace sinkscope::emu {
namespace {

constexpr uint64_t kHandleMagic = 0x4c7448616e646c65;  // "LtHandle"
constexpr uint64_t kDescMagic = 0x4c744d6d44657363;    // "LtMmDesc"
constexpr uint64_t kLayoutMagic = 0x4c744c61796f7574;  // "LtLayout"
constexpr uint64_t kPrefMagic = 0x4c74507265666572;    // "LtPrefer"
constexpr uint64_t kAlgoMagic = 0x456d75416c676f31;    // "EmuAlgo1"
constexpr uint32_t kDefaultAlignment = 256;  // cuBLASLt's default for MIN_ALIGNMENT_*_BYTES

struct MatmulDesc {
  uint64_t magic = kDescMagic;
  int32_t compute = 0;
  int32_t scale = 0;
  int32_t pointer_mode = CUBLASLT_POINTER_MODE_HOST;
  int32_t trans_a = CUBLAS_OP_N, trans_b = CUBLAS_OP_N, trans_c = CUBLAS_OP_N;
  int32_t fill_mode = CUBLAS_FILL_MODE_FULL;
  uint32_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
  const void* bias = nullptr;
  int64_t bias_batch_stride = 0;
  int32_t bias_type = -1;  // -1: the type of D, as cuBLASLt documents
};

struct Layout {
  uint64_t magic = kLayoutMagic;
  uint32_t type = 0;
  int32_t order = CUBLASLT_ORDER_COL;
  uint64_t rows = 0, cols = 0;
  int64_t ld = 0;
  int32_t batch = 1;
  int64_t batch_stride = 0;
  int64_t plane_offset = 0;
  uint32_t batch_mode = CUBLASLT_BATCH_MODE_STRIDED;
};

struct Preference {
  uint64_t magic = kPrefMagic;
  uint32_t search_mode = 0;
  uint64_t max_workspace = 0;
  uint32_t reduction_mask = CUBLASLT_REDUCTION_SCHEME_MASK;
  uint32_t align[4] = {kDefaultAlignment, kDefaultAlignment, kDefaultAlignment, kDefaultAlignment};  // A B C D
  float max_waves = 0;
  uint64_t impl_mask = ~uint64_t{0};
};

// What the heuristic writes into cublasLtMatmulAlgo_t::data, so cublasLtMatmul can hold the
// caller to the contract the algorithm was chosen under.
enum AlgoSlot { kSlotMagic, kSlotAlign, kSlotBiasAlign, kSlotWorkspace, kSlotConfig };

MatmulDesc* AsDesc(cublasLtMatmulDesc_t d) { return reinterpret_cast<MatmulDesc*>(d); }
Layout* AsLayout(cublasLtMatrixLayout_t l) { return reinterpret_cast<Layout*>(l); }
Preference* AsPref(cublasLtMatmulPreference_t p) { return reinterpret_cast<Preference*>(p); }

cublasStatus_t Fail(cublasStatus_t status, const char* fn, const std::string& why) {
  std::fprintf(stderr, "emulated %s: %s\n", fn, why.c_str());
  return status;
}

const char* TypeName(uint32_t t) {
  switch (t) {
    case CUDA_R_32F: return "32F";
    case CUDA_R_16BF: return "16BF";
    case CUDA_R_16F: return "16F";
    case CUDA_R_64F: return "64F";
    case CUDA_R_8I: return "8I";
    case CUDA_R_32I: return "32I";
    default: return "unsupported type";
  }
}

const char* ComputeName(int32_t c) {
  switch (c) {
    case CUBLAS_COMPUTE_32F: return "32F";
    case CUBLAS_COMPUTE_32F_FAST_TF32: return "32F_FAST_TF32";
    case CUBLAS_COMPUTE_32F_FAST_16BF: return "32F_FAST_16BF";
    case CUBLAS_COMPUTE_32F_FAST_16F: return "32F_FAST_16F";
    case CUBLAS_COMPUTE_32F_PEDANTIC: return "32F_PEDANTIC";
    default: return "unsupported compute type";
  }
}

size_t ElementBytes(uint32_t t) { return t == CUDA_R_16BF ? 2 : 4; }

std::string Describe(const char* name, const Layout& l) {
  return std::string(name) + " (" + TypeName(l.type) + ", " + std::to_string(l.rows) + "x" + std::to_string(l.cols) +
         ", ld " + std::to_string(l.ld) + (l.batch > 1 ? ", batch " + std::to_string(l.batch) : std::string()) + ")";
}

// ---- attribute plumbing ---------------------------------------------------------------------
// cuBLASLt checks sizeInBytes against the attribute's storage exactly; so does the stand-in.
template <typename T>
cublasStatus_t SetField(T& field, const void* buf, size_t size, const char* fn, const char* attr) {
  if (buf == nullptr) return Fail(CUBLAS_STATUS_INVALID_VALUE, fn, std::string(attr) + ": buf is null");
  if (size != sizeof(T)) {
    return Fail(CUBLAS_STATUS_INVALID_VALUE, fn,
                std::string(attr) + ": sizeInBytes " + std::to_string(size) + " != " + std::to_string(sizeof(T)));
  }
  std::memcpy(&field, buf, sizeof(T));
  return CUBLAS_STATUS_SUCCESS;
}

template <typename T>
cublasStatus_t GetField(const T& field, void* buf, size_t size, size_t* written, const char* fn, const char* attr) {
  if (size == 0) {
    if (written == nullptr) return Fail(CUBLAS_STATUS_INVALID_VALUE, fn, std::string(attr) + ": sizeInBytes 0 and sizeWritten null");
    *written = sizeof(T);
    return CUBLAS_STATUS_SUCCESS;
  }
  if (buf == nullptr) return Fail(CUBLAS_STATUS_INVALID_VALUE, fn, std::string(attr) + ": buf is null");
  if (size != sizeof(T)) {
    return Fail(CUBLAS_STATUS_INVALID_VALUE, fn,
                std::string(attr) + ": sizeInBytes " + std::to_string(size) + " != " + std::to_string(sizeof(T)));
  }
  std::memcpy(buf, &field, sizeof(T));
  if (written != nullptr) *written = sizeof(T);
  return CUBLAS_STATUS_SUCCESS;
}

// Visits the storage of a descriptor attribute; false for one the stand-in does not model.
template <typename F>
bool WithDescField(MatmulDesc& d, cublasLtMatmulDescAttributes_t attr, F&& f) {
  switch (attr) {
    case CUBLASLT_MATMUL_DESC_COMPUTE_TYPE: f(d.compute, "CUBLASLT_MATMUL_DESC_COMPUTE_TYPE"); return true;
    case CUBLASLT_MATMUL_DESC_SCALE_TYPE: f(d.scale, "CUBLASLT_MATMUL_DESC_SCALE_TYPE"); return true;
    case CUBLASLT_MATMUL_DESC_POINTER_MODE: f(d.pointer_mode, "CUBLASLT_MATMUL_DESC_POINTER_MODE"); return true;
    case CUBLASLT_MATMUL_DESC_TRANSA: f(d.trans_a, "CUBLASLT_MATMUL_DESC_TRANSA"); return true;
    case CUBLASLT_MATMUL_DESC_TRANSB: f(d.trans_b, "CUBLASLT_MATMUL_DESC_TRANSB"); return true;
    case CUBLASLT_MATMUL_DESC_TRANSC: f(d.trans_c, "CUBLASLT_MATMUL_DESC_TRANSC"); return true;
    case CUBLASLT_MATMUL_DESC_FILL_MODE: f(d.fill_mode, "CUBLASLT_MATMUL_DESC_FILL_MODE"); return true;
    case CUBLASLT_MATMUL_DESC_EPILOGUE: f(d.epilogue, "CUBLASLT_MATMUL_DESC_EPILOGUE"); return true;
    case CUBLASLT_MATMUL_DESC_BIAS_POINTER: f(d.bias, "CUBLASLT_MATMUL_DESC_BIAS_POINTER"); return true;
    case CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE: f(d.bias_batch_stride, "CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE"); return true;
    case CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE: f(d.bias_type, "CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE"); return true;
    default: return false;
  }
}

template <typename F>
bool WithLayoutField(Layout& l, cublasLtMatrixLayoutAttribute_t attr, F&& f) {
  switch (attr) {
    case CUBLASLT_MATRIX_LAYOUT_TYPE: f(l.type, "CUBLASLT_MATRIX_LAYOUT_TYPE"); return true;
    case CUBLASLT_MATRIX_LAYOUT_ORDER: f(l.order, "CUBLASLT_MATRIX_LAYOUT_ORDER"); return true;
    case CUBLASLT_MATRIX_LAYOUT_ROWS: f(l.rows, "CUBLASLT_MATRIX_LAYOUT_ROWS"); return true;
    case CUBLASLT_MATRIX_LAYOUT_COLS: f(l.cols, "CUBLASLT_MATRIX_LAYOUT_COLS"); return true;
    case CUBLASLT_MATRIX_LAYOUT_LD: f(l.ld, "CUBLASLT_MATRIX_LAYOUT_LD"); return true;
    case CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT: f(l.batch, "CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT"); return true;
    case CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET: f(l.batch_stride, "CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET"); return true;
    case CUBLASLT_MATRIX_LAYOUT_PLANE_OFFSET: f(l.plane_offset, "CUBLASLT_MATRIX_LAYOUT_PLANE_OFFSET"); return true;
    case CUBLASLT_MATRIX_LAYOUT_BATCH_MODE: f(l.batch_mode, "CUBLASLT_MATRIX_LAYOUT_BATCH_MODE"); return true;
    default: return false;
  }
}

template <typename F>
bool WithPrefField(Preference& p, cublasLtMatmulPreferenceAttributes_t attr, F&& f) {
  switch (attr) {
    case CUBLASLT_MATMUL_PREF_SEARCH_MODE: f(p.search_mode, "CUBLASLT_MATMUL_PREF_SEARCH_MODE"); return true;
    case CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES: f(p.max_workspace, "CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES"); return true;
    case CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK: f(p.reduction_mask, "CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK"); return true;
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES: f(p.align[0], "CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES"); return true;
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES: f(p.align[1], "CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES"); return true;
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES: f(p.align[2], "CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES"); return true;
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES: f(p.align[3], "CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES"); return true;
    case CUBLASLT_MATMUL_PREF_MAX_WAVES_COUNT: f(p.max_waves, "CUBLASLT_MATMUL_PREF_MAX_WAVES_COUNT"); return true;
    case CUBLASLT_MATMUL_PREF_IMPL_MASK: f(p.impl_mask, "CUBLASLT_MATMUL_PREF_IMPL_MASK"); return true;
    default: return false;
  }
}

// ---- the problem a descriptor and four layouts describe --------------------------------------
enum class Rounding { kNone, kTf32, kBf16 };

struct Problem {
  int64_t m = 0, n = 0, k = 0, batch = 1;
  bool trans_a = false, trans_b = false;
  bool bias = false;
  uint32_t bias_type = CUDA_R_32F;
  Rounding rounding = Rounding::kNone;  // what the compute type does to fp32 operands
};

// The checks cuBLASLt makes of a configuration, shared by the heuristic and the matmul so a
// plan that cannot run is refused where it is made.
cublasStatus_t CheckProblem(const char* fn, const MatmulDesc& d, const Layout& a, const Layout& b, const Layout& c,
                            const Layout& dd, Problem* p) {
  if (d.scale != CUDA_R_32F) {
    return Fail(CUBLAS_STATUS_NOT_SUPPORTED, fn, std::string("scale type ") + TypeName(d.scale) + " (only 32F is emulated)");
  }
  if (d.pointer_mode != CUBLASLT_POINTER_MODE_HOST) {
    return Fail(CUBLAS_STATUS_NOT_SUPPORTED, fn,
                "pointer mode " + std::to_string(d.pointer_mode) + " (only CUBLASLT_POINTER_MODE_HOST is emulated)");
  }
  for (const auto& [op, name] : {std::pair{d.trans_a, "TRANSA"}, std::pair{d.trans_b, "TRANSB"}}) {
    if (op == CUBLAS_OP_C) {
      return Fail(CUBLAS_STATUS_NOT_SUPPORTED, fn, std::string(name) + " CUBLAS_OP_C is not supported for real types");
    }
    if (op != CUBLAS_OP_N && op != CUBLAS_OP_T) {
      return Fail(CUBLAS_STATUS_INVALID_VALUE, fn, std::string(name) + " " + std::to_string(op) + " is not a cublasOperation_t");
    }
  }
  if (d.trans_c != CUBLAS_OP_N) return Fail(CUBLAS_STATUS_NOT_SUPPORTED, fn, "TRANSC must be CUBLAS_OP_N");
  if (d.fill_mode != CUBLAS_FILL_MODE_FULL) return Fail(CUBLAS_STATUS_NOT_SUPPORTED, fn, "FILL_MODE must be CUBLAS_FILL_MODE_FULL");
  if (d.epilogue != CUBLASLT_EPILOGUE_DEFAULT && d.epilogue != CUBLASLT_EPILOGUE_BIAS) {
    return Fail(CUBLAS_STATUS_NOT_SUPPORTED, fn,
                "epilogue " + std::to_string(d.epilogue) + " (only DEFAULT and BIAS are emulated)");
  }

  const std::pair<const Layout*, const char*> all[] = {{&a, "A"}, {&b, "B"}, {&c, "C"}, {&dd, "D"}};
  for (const auto& [l, name] : all) {
    if (l->order != CUBLASLT_ORDER_COL) {
      return Fail(CUBLAS_STATUS_NOT_SUPPORTED, fn, Describe(name, *l) + " has order " + std::to_string(l->order) +
                                                       " (only CUBLASLT_ORDER_COL is emulated)");
    }
    if (l->batch_mode != CUBLASLT_BATCH_MODE_STRIDED || l->plane_offset != 0) {
      return Fail(CUBLAS_STATUS_NOT_SUPPORTED, fn, Describe(name, *l) + " is pointer-array batched or planar complex");
    }
    if (l->type != CUDA_R_32F && l->type != CUDA_R_16BF) {
      return Fail(CUBLAS_STATUS_NOT_SUPPORTED, fn, Describe(name, *l) + ": only 32F and 16BF are emulated");
    }
    if (l->rows > INT32_MAX || l->cols > INT32_MAX) {
      return Fail(CUBLAS_STATUS_NOT_SUPPORTED, fn, Describe(name, *l) + " has a dimension beyond int32");
    }
    if (l->ld < 0 || static_cast<uint64_t>(l->ld) < l->rows) {
      return Fail(CUBLAS_STATUS_INVALID_VALUE, fn, Describe(name, *l) + " has ld < rows");
    }
    if (l->batch < 1) return Fail(CUBLAS_STATUS_INVALID_VALUE, fn, Describe(name, *l) + " has batch count < 1");
    if (l->batch_stride < 0) return Fail(CUBLAS_STATUS_INVALID_VALUE, fn, Describe(name, *l) + " has a negative batch stride");
  }

  // The combinations of cuBLASLt's table of regular matmul types that the stand-in knows.
  if (a.type != b.type) {
    return Fail(CUBLAS_STATUS_NOT_SUPPORTED, fn, Describe("A", a) + " and " + Describe("B", b) + " differ in type");
  }
  if (c.type != dd.type) {
    return Fail(CUBLAS_STATUS_NOT_SUPPORTED, fn, Describe("C", c) + " and " + Describe("D", dd) + " differ in type");
  }
  p->rounding = Rounding::kNone;
  if (a.type == CUDA_R_32F) {
    if (dd.type != CUDA_R_32F) {
      return Fail(CUBLAS_STATUS_NOT_SUPPORTED, fn, "32F A and B need a 32F C and D, not " + std::string(TypeName(dd.type)));
    }
    if (d.compute == CUBLAS_COMPUTE_32F_FAST_TF32) {
      p->rounding = Rounding::kTf32;
    } else if (d.compute == CUBLAS_COMPUTE_32F_FAST_16BF) {
      p->rounding = Rounding::kBf16;
    } else if (d.compute != CUBLAS_COMPUTE_32F) {
      return Fail(CUBLAS_STATUS_NOT_SUPPORTED, fn, std::string("compute type ") + ComputeName(d.compute) +
                                                       " with 32F inputs (emulated: 32F, 32F_FAST_TF32, 32F_FAST_16BF)");
    }
  } else if (d.compute != CUBLAS_COMPUTE_32F) {  // 16BF inputs: cuBLASLt lists COMPUTE_32F only
    return Fail(CUBLAS_STATUS_NOT_SUPPORTED, fn,
                std::string("compute type ") + ComputeName(d.compute) + " with 16BF inputs (emulated: 32F)");
  }

  p->trans_a = d.trans_a == CUBLAS_OP_T;
  p->trans_b = d.trans_b == CUBLAS_OP_T;
  p->m = static_cast<int64_t>(dd.rows);
  p->n = static_cast<int64_t>(dd.cols);
  p->k = static_cast<int64_t>(p->trans_a ? a.rows : a.cols);
  const int64_t a_m = static_cast<int64_t>(p->trans_a ? a.cols : a.rows);
  const int64_t b_k = static_cast<int64_t>(p->trans_b ? b.cols : b.rows);
  const int64_t b_n = static_cast<int64_t>(p->trans_b ? b.rows : b.cols);
  const std::string shapes = Describe("A", a) + (p->trans_a ? "ᵀ" : "") + " · " + Describe("B", b) +
                             (p->trans_b ? "ᵀ" : "") + " → " + Describe("D", dd);
  if (a_m != p->m) return Fail(CUBLAS_STATUS_INVALID_VALUE, fn, shapes + ": op(A) has " + std::to_string(a_m) + " rows, D " + std::to_string(p->m));
  if (b_n != p->n) return Fail(CUBLAS_STATUS_INVALID_VALUE, fn, shapes + ": op(B) has " + std::to_string(b_n) + " columns, D " + std::to_string(p->n));
  if (b_k != p->k) return Fail(CUBLAS_STATUS_INVALID_VALUE, fn, shapes + ": op(A) has " + std::to_string(p->k) + " columns, op(B) " + std::to_string(b_k) + " rows");
  if (c.rows != dd.rows || c.cols != dd.cols) {
    return Fail(CUBLAS_STATUS_INVALID_VALUE, fn, Describe("C", c) + " and " + Describe("D", dd) + " differ in shape");
  }
  if (a.batch != dd.batch || b.batch != dd.batch || c.batch != dd.batch) {
    return Fail(CUBLAS_STATUS_INVALID_VALUE, fn, "batch counts differ: A " + std::to_string(a.batch) + ", B " +
                                                     std::to_string(b.batch) + ", C " + std::to_string(c.batch) + ", D " +
                                                     std::to_string(dd.batch));
  }
  p->batch = dd.batch;
  // Batches of D that overlap are written concurrently on a GPU: the result depends on timing.
  if (p->batch > 1 && p->m > 0 && p->n > 0 && dd.batch_stride < (p->n - 1) * dd.ld + p->m) {
    return Fail(CUBLAS_STATUS_INVALID_VALUE, fn,
                Describe("D", dd) + " has batch stride " + std::to_string(dd.batch_stride) + ": its batches overlap");
  }

  p->bias = d.epilogue == CUBLASLT_EPILOGUE_BIAS;
  if (p->bias) {
    p->bias_type = d.bias_type == -1 ? dd.type : static_cast<uint32_t>(d.bias_type);
    if (p->bias_type != CUDA_R_32F && p->bias_type != CUDA_R_16BF) {
      return Fail(CUBLAS_STATUS_NOT_SUPPORTED, fn, std::string("BIAS_DATA_TYPE ") + TypeName(p->bias_type) + " (emulated: 32F, 16BF)");
    }
    if (d.bias_batch_stride < 0) return Fail(CUBLAS_STATUS_INVALID_VALUE, fn, "BIAS_BATCH_STRIDE is negative");
  }
  return CUBLAS_STATUS_SUCCESS;
}

// Ties an algorithm to the types, transposes and epilogue it was chosen for (not the shape:
// a cuBLASLt algorithm runs any shape of its configuration).
uint64_t ConfigFingerprint(const MatmulDesc& d, const Layout& a, const Layout& c, const Problem& p) {
  uint64_t h = 1469598103934665603ull;
  for (const uint64_t v : {uint64_t(uint32_t(d.compute)), uint64_t(a.type), uint64_t(c.type), uint64_t(p.trans_a),
                           uint64_t(p.trans_b), uint64_t(d.epilogue), uint64_t(p.bias ? p.bias_type : 0xff)}) {
    h = (h ^ v) * 1099511628211ull;
  }
  return h;
}

// The largest power of two ≤ 256 an address (or a preference) is a multiple of.
uint32_t PowerOfTwoAlignment(uint64_t v) {
  uint32_t a = kDefaultAlignment;
  while (a > 1 && v % a != 0) a /= 2;
  return a;
}

// Elements a layout addresses from its base pointer over all batches (0 when empty).
int64_t ExtentElements(const Layout& l) {
  if (l.rows == 0 || l.cols == 0) return 0;
  return (l.batch - 1) * l.batch_stride + (static_cast<int64_t>(l.cols) - 1) * l.ld + static_cast<int64_t>(l.rows);
}

// ---- numerics ---------------------------------------------------------------------------------
float Bf16ToFloat(uint16_t h) {
  const uint32_t bits = uint32_t{h} << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t FloatToBf16(float f) {  // round to nearest even; NaN stays a quiet NaN
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x0040u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

float RoundToTf32(float f) {  // 10 explicit mantissa bits, round to nearest even
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7f800000u) == 0x7f800000u) return f;  // Inf and NaN as they are
  bits += 0x0fffu + ((bits >> 13) & 1u);
  bits &= ~0x1fffu;
  std::memcpy(&f, &bits, 4);
  return f;
}

double LoadAs(const void* base, uint32_t type, int64_t index) {
  if (type == CUDA_R_16BF) return Bf16ToFloat(static_cast<const uint16_t*>(base)[index]);
  return static_cast<const float*>(base)[index];
}

constexpr int kPanel = 4;  // the micro-kernel's tile is kPanel×kPanel

// Packs op(X)'s rows in panels of kPanel, k-major within a panel: element (r, p), at
// base[r·rs + p·ps], goes to out[(r / kPanel)·k·kPanel + p·kPanel + r % kPanel], with the compute
// type's rounding applied. Rows past `rows` are zero, so the micro-kernel needs no remainder,
// and its kPanel + kPanel loads per step are contiguous.
void Pack(const void* base, uint32_t type, int64_t rs, int64_t ps, int64_t rows, int64_t k, Rounding rounding,
          std::vector<double>& out) {
  const int64_t panels = (rows + kPanel - 1) / kPanel;
  out.assign(static_cast<size_t>(panels * kPanel * k), 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    double* o = out.data() + (r / kPanel) * k * kPanel + r % kPanel;
    if (type == CUDA_R_16BF) {
      const auto* x = static_cast<const uint16_t*>(base) + r * rs;
      for (int64_t p = 0; p < k; ++p) o[p * kPanel] = Bf16ToFloat(x[p * ps]);
    } else {
      const auto* x = static_cast<const float*>(base) + r * rs;
      switch (rounding) {
        case Rounding::kNone: for (int64_t p = 0; p < k; ++p) o[p * kPanel] = x[p * ps]; break;
        case Rounding::kTf32: for (int64_t p = 0; p < k; ++p) o[p * kPanel] = RoundToTf32(x[p * ps]); break;
        case Rounding::kBf16: for (int64_t p = 0; p < k; ++p) o[p * kPanel] = Bf16ToFloat(FloatToBf16(x[p * ps])); break;
      }
    }
  }
}

// One kPanel×kPanel tile of dot products from a panel of op(A) and a panel of op(B)ᵀ.
void MicroKernel(const double* a, const double* b, int64_t k, double out[kPanel][kPanel]) {
  double acc[kPanel][kPanel] = {};
  for (int64_t p = 0; p < k; ++p) {
    const double* ap = a + p * kPanel;
    const double* bp = b + p * kPanel;
    for (int i = 0; i < kPanel; ++i)
      for (int j = 0; j < kPanel; ++j) acc[i][j] += ap[i] * bp[j];
  }
  for (int i = 0; i < kPanel; ++i)
    for (int j = 0; j < kPanel; ++j) out[i][j] = acc[i][j];
}

struct Operands {
  const void *a, *b, *c, *bias;
  void* d;
  float alpha, beta;
};

// cuBLASLt leaves its summation order unspecified (it differs between algorithms, split-k and
// GPUs), so no order is "the" result: each dot product is summed in double (fp32 and bf16
// products are exact there) and rounded once, a near-exact reference the tests compare to the
// CPU backend with tolerances. The epilogue is computed in double too and rounded once to fp32;
// a bf16 D is then rounded from that fp32 value, as the GPU rounds its fp32 result.
void Compute(const Problem& p, const Layout& la, const Layout& lb, const Layout& lc, const Layout& ld,
             int64_t bias_batch_stride, const Operands& x) {
  thread_local std::vector<double> op_a, op_b;
  const size_t ea = ElementBytes(la.type), eb = ElementBytes(lb.type), ec = ElementBytes(lc.type),
               ed = ElementBytes(ld.type), ebias = ElementBytes(p.bias_type);
  for (int64_t item = 0; item < p.batch; ++item) {
    const auto* a = static_cast<const char*>(x.a) + item * la.batch_stride * ea;
    const auto* b = static_cast<const char*>(x.b) + item * lb.batch_stride * eb;
    const auto* c = x.beta != 0 ? static_cast<const char*>(x.c) + item * lc.batch_stride * ec : nullptr;
    auto* d = static_cast<char*>(x.d) + item * ld.batch_stride * ed;
    const auto* bias = p.bias ? static_cast<const char*>(x.bias) + item * bias_batch_stride * ebias : nullptr;
    // op(A) is m×k: element (i, p) sits at i + p·lda, or p + i·lda when A is stored transposed.
    Pack(a, la.type, p.trans_a ? la.ld : 1, p.trans_a ? 1 : la.ld, p.m, p.k, p.rounding, op_a);
    // op(B) is k×n, packed as its transpose: element (p, j) at p + j·ldb, or j + p·ldb.
    Pack(b, lb.type, p.trans_b ? 1 : lb.ld, p.trans_b ? lb.ld : 1, p.n, p.k, p.rounding, op_b);
    for (int64_t j0 = 0; j0 < p.n; j0 += kPanel) {
      for (int64_t i0 = 0; i0 < p.m; i0 += kPanel) {
        double tile[kPanel][kPanel];
        MicroKernel(op_a.data() + i0 * p.k, op_b.data() + j0 * p.k, p.k, tile);
        for (int jj = 0; jj < kPanel && j0 + jj < p.n; ++jj) {
          const int64_t j = j0 + jj;
          for (int ii = 0; ii < kPanel && i0 + ii < p.m; ++ii) {
            const int64_t i = i0 + ii;
            double v = static_cast<double>(x.alpha) * tile[ii][jj];
            if (c != nullptr) v += static_cast<double>(x.beta) * LoadAs(c, lc.type, i + j * lc.ld);  // beta 0: C unread
            if (bias != nullptr) v += LoadAs(bias, p.bias_type, i);
            const float f = static_cast<float>(v);
            if (ld.type == CUDA_R_16BF) {
              reinterpret_cast<uint16_t*>(d)[i + j * ld.ld] = FloatToBf16(f);
            } else {
              reinterpret_cast<float*>(d)[i + j * ld.ld] = f;
            }
          }
        }
      }
    }
  }
}

bool Overlap(const void* p, size_t p_bytes, const void* q, size_t q_bytes) {
  if (p == nullptr || q == nullptr || p_bytes == 0 || q_bytes == 0) return false;
  const auto a = reinterpret_cast<uintptr_t>(p), b = reinterpret_cast<uintptr_t>(q);
  return a < b + q_bytes && b < a + p_bytes;
}

std::string Hex(const void* p) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%p", p);
  return buf;
}

}  // namespace
}  // namespace sinkscope::emu

namespace emu = sinkscope::emu;

// ---- status text -----------------------------------------------------------------------------
const char* CUBLASWINAPI cublasGetStatusName(cublasStatus_t status) {
  switch (status) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_LICENSE_ERROR: return "CUBLAS_STATUS_LICENSE_ERROR";
  }
  return "CUBLAS_STATUS_UNKNOWN";
}

const char* CUBLASWINAPI cublasGetStatusString(cublasStatus_t status) {
  switch (status) {
    case CUBLAS_STATUS_SUCCESS: return "success";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "the library was not initialized";
    case CUBLAS_STATUS_ALLOC_FAILED: return "the resource allocation failed";
    case CUBLAS_STATUS_INVALID_VALUE: return "an invalid value was used as an argument";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "an absent device architectural feature is required";
    case CUBLAS_STATUS_MAPPING_ERROR: return "an access to GPU memory space failed";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "the GPU program failed to execute";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "an internal operation failed";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "the functionality requested is not supported";
    case CUBLAS_STATUS_LICENSE_ERROR: return "the functionality requested requires a license";
  }
  return "unknown cuBLAS status";
}

// ---- handle ------------------------------------------------------------------------------------
cublasStatus_t CUBLASWINAPI cublasLtCreate(cublasLtHandle_t* lightHandle) {
  if (lightHandle == nullptr) return emu::Fail(CUBLAS_STATUS_INVALID_VALUE, "cublasLtCreate", "lightHandle is null");
  *lightHandle = new cublasLtContext{emu::kHandleMagic};
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t CUBLASWINAPI cublasLtDestroy(cublasLtHandle_t lightHandle) {
  if (lightHandle == nullptr || lightHandle->magic != emu::kHandleMagic) {
    return emu::Fail(CUBLAS_STATUS_NOT_INITIALIZED, "cublasLtDestroy", "the handle is null or not a live cuBLASLt handle");
  }
  lightHandle->magic = 0;
  delete lightHandle;
  return CUBLAS_STATUS_SUCCESS;
}

// ---- matmul descriptor --------------------------------------------------------------------------
cublasStatus_t CUBLASWINAPI cublasLtMatmulDescCreate(cublasLtMatmulDesc_t* matmulDesc, cublasComputeType_t computeType,
                                                     cudaDataType_t scaleType) {
  if (matmulDesc == nullptr) return emu::Fail(CUBLAS_STATUS_INVALID_VALUE, "cublasLtMatmulDescCreate", "matmulDesc is null");
  auto* d = new emu::MatmulDesc;
  d->compute = computeType;
  d->scale = scaleType;
  *matmulDesc = reinterpret_cast<cublasLtMatmulDesc_t>(d);
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t CUBLASWINAPI cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t matmulDesc) {
  emu::MatmulDesc* d = emu::AsDesc(matmulDesc);
  if (d == nullptr) return CUBLAS_STATUS_SUCCESS;
  if (d->magic != emu::kDescMagic) {
    return emu::Fail(CUBLAS_STATUS_INVALID_VALUE, "cublasLtMatmulDescDestroy", "not a live matmul descriptor");
  }
  d->magic = 0;
  delete d;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t CUBLASWINAPI cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t matmulDesc,
                                                           cublasLtMatmulDescAttributes_t attr, const void* buf,
                                                           size_t sizeInBytes) {
  constexpr const char* kFn = "cublasLtMatmulDescSetAttribute";
  emu::MatmulDesc* d = emu::AsDesc(matmulDesc);
  if (d == nullptr || d->magic != emu::kDescMagic) {
    return emu::Fail(CUBLAS_STATUS_INVALID_VALUE, kFn, "matmulDesc is null or not a live matmul descriptor");
  }
  cublasStatus_t status = CUBLAS_STATUS_SUCCESS;
  const bool known = emu::WithDescField(
      *d, attr, [&](auto& field, const char* name) { status = emu::SetField(field, buf, sizeInBytes, kFn, name); });
  if (!known) return emu::Fail(CUBLAS_STATUS_NOT_SUPPORTED, kFn, "attribute " + std::to_string(attr) + " is not emulated");
  return status;
}

cublasStatus_t CUBLASWINAPI cublasLtMatmulDescGetAttribute(cublasLtMatmulDesc_t matmulDesc,
                                                           cublasLtMatmulDescAttributes_t attr, void* buf,
                                                           size_t sizeInBytes, size_t* sizeWritten) {
  constexpr const char* kFn = "cublasLtMatmulDescGetAttribute";
  emu::MatmulDesc* d = emu::AsDesc(matmulDesc);
  if (d == nullptr || d->magic != emu::kDescMagic) {
    return emu::Fail(CUBLAS_STATUS_INVALID_VALUE, kFn, "matmulDesc is null or not a live matmul descriptor");
  }
  cublasStatus_t status = CUBLAS_STATUS_SUCCESS;
  const bool known = emu::WithDescField(*d, attr, [&](auto& field, const char* name) {
    status = emu::GetField(field, buf, sizeInBytes, sizeWritten, kFn, name);
  });
  if (!known) return emu::Fail(CUBLAS_STATUS_NOT_SUPPORTED, kFn, "attribute " + std::to_string(attr) + " is not emulated");
  return status;
}

// ---- matrix layout --------------------------------------------------------------------------------
cublasStatus_t CUBLASWINAPI cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t* matLayout, cudaDataType type,
                                                       uint64_t rows, uint64_t cols, int64_t ld) {
  if (matLayout == nullptr) return emu::Fail(CUBLAS_STATUS_INVALID_VALUE, "cublasLtMatrixLayoutCreate", "matLayout is null");
  auto* l = new emu::Layout;
  l->type = static_cast<uint32_t>(type);
  l->rows = rows;
  l->cols = cols;
  l->ld = ld;
  *matLayout = reinterpret_cast<cublasLtMatrixLayout_t>(l);
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t CUBLASWINAPI cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t matLayout) {
  emu::Layout* l = emu::AsLayout(matLayout);
  if (l == nullptr) return CUBLAS_STATUS_SUCCESS;
  if (l->magic != emu::kLayoutMagic) {
    return emu::Fail(CUBLAS_STATUS_INVALID_VALUE, "cublasLtMatrixLayoutDestroy", "not a live matrix layout");
  }
  l->magic = 0;
  delete l;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t CUBLASWINAPI cublasLtMatrixLayoutSetAttribute(cublasLtMatrixLayout_t matLayout,
                                                             cublasLtMatrixLayoutAttribute_t attr, const void* buf,
                                                             size_t sizeInBytes) {
  constexpr const char* kFn = "cublasLtMatrixLayoutSetAttribute";
  emu::Layout* l = emu::AsLayout(matLayout);
  if (l == nullptr || l->magic != emu::kLayoutMagic) {
    return emu::Fail(CUBLAS_STATUS_INVALID_VALUE, kFn, "matLayout is null or not a live matrix layout");
  }
  cublasStatus_t status = CUBLAS_STATUS_SUCCESS;
  const bool known = emu::WithLayoutField(
      *l, attr, [&](auto& field, const char* name) { status = emu::SetField(field, buf, sizeInBytes, kFn, name); });
  if (!known) return emu::Fail(CUBLAS_STATUS_NOT_SUPPORTED, kFn, "attribute " + std::to_string(attr) + " is not emulated");
  return status;
}

cublasStatus_t CUBLASWINAPI cublasLtMatrixLayoutGetAttribute(cublasLtMatrixLayout_t matLayout,
                                                             cublasLtMatrixLayoutAttribute_t attr, void* buf,
                                                             size_t sizeInBytes, size_t* sizeWritten) {
  constexpr const char* kFn = "cublasLtMatrixLayoutGetAttribute";
  emu::Layout* l = emu::AsLayout(matLayout);
  if (l == nullptr || l->magic != emu::kLayoutMagic) {
    return emu::Fail(CUBLAS_STATUS_INVALID_VALUE, kFn, "matLayout is null or not a live matrix layout");
  }
  cublasStatus_t status = CUBLAS_STATUS_SUCCESS;
  const bool known = emu::WithLayoutField(*l, attr, [&](auto& field, const char* name) {
    status = emu::GetField(field, buf, sizeInBytes, sizeWritten, kFn, name);
  });
  if (!known) return emu::Fail(CUBLAS_STATUS_NOT_SUPPORTED, kFn, "attribute " + std::to_string(attr) + " is not emulated");
  return status;
}

// ---- preference --------------------------------------------------------------------------------------
cublasStatus_t CUBLASWINAPI cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t* pref) {
  if (pref == nullptr) return emu::Fail(CUBLAS_STATUS_INVALID_VALUE, "cublasLtMatmulPreferenceCreate", "pref is null");
  *pref = reinterpret_cast<cublasLtMatmulPreference_t>(new emu::Preference);
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t CUBLASWINAPI cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t pref) {
  emu::Preference* p = emu::AsPref(pref);
  if (p == nullptr) return CUBLAS_STATUS_SUCCESS;
  if (p->magic != emu::kPrefMagic) {
    return emu::Fail(CUBLAS_STATUS_INVALID_VALUE, "cublasLtMatmulPreferenceDestroy", "not a live matmul preference");
  }
  p->magic = 0;
  delete p;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t CUBLASWINAPI cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t pref,
                                                                 cublasLtMatmulPreferenceAttributes_t attr,
                                                                 const void* buf, size_t sizeInBytes) {
  constexpr const char* kFn = "cublasLtMatmulPreferenceSetAttribute";
  emu::Preference* p = emu::AsPref(pref);
  if (p == nullptr || p->magic != emu::kPrefMagic) {
    return emu::Fail(CUBLAS_STATUS_INVALID_VALUE, kFn, "pref is null or not a live matmul preference");
  }
  cublasStatus_t status = CUBLAS_STATUS_SUCCESS;
  const bool known = emu::WithPrefField(
      *p, attr, [&](auto& field, const char* name) { status = emu::SetField(field, buf, sizeInBytes, kFn, name); });
  if (!known) return emu::Fail(CUBLAS_STATUS_NOT_SUPPORTED, kFn, "attribute " + std::to_string(attr) + " is not emulated");
  return status;
}

// ---- heuristic -----------------------------------------------------------------------------------------
cublasStatus_t CUBLASWINAPI cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t lightHandle,
                                                           cublasLtMatmulDesc_t operationDesc,
                                                           cublasLtMatrixLayout_t Adesc, cublasLtMatrixLayout_t Bdesc,
                                                           cublasLtMatrixLayout_t Cdesc, cublasLtMatrixLayout_t Ddesc,
                                                           cublasLtMatmulPreference_t preference,
                                                           int requestedAlgoCount,
                                                           cublasLtMatmulHeuristicResult_t heuristicResultsArray[],
                                                           int* returnAlgoCount) {
  constexpr const char* kFn = "cublasLtMatmulAlgoGetHeuristic";
  if (lightHandle == nullptr || lightHandle->magic != emu::kHandleMagic) {
    return emu::Fail(CUBLAS_STATUS_NOT_INITIALIZED, kFn, "the handle is null or not a live cuBLASLt handle");
  }
  const emu::MatmulDesc* d = emu::AsDesc(operationDesc);
  const emu::Layout *a = emu::AsLayout(Adesc), *b = emu::AsLayout(Bdesc), *c = emu::AsLayout(Cdesc),
                    *dd = emu::AsLayout(Ddesc);
  const emu::Preference* pref = emu::AsPref(preference);
  if (d == nullptr || d->magic != emu::kDescMagic) return emu::Fail(CUBLAS_STATUS_INVALID_VALUE, kFn, "operationDesc is null or not live");
  for (const auto& [l, name] : {std::pair{a, "Adesc"}, std::pair{b, "Bdesc"}, std::pair{c, "Cdesc"}, std::pair{dd, "Ddesc"}}) {
    if (l == nullptr || l->magic != emu::kLayoutMagic) {
      return emu::Fail(CUBLAS_STATUS_INVALID_VALUE, kFn, std::string(name) + " is null or not a live matrix layout");
    }
  }
  if (pref == nullptr || pref->magic != emu::kPrefMagic) return emu::Fail(CUBLAS_STATUS_INVALID_VALUE, kFn, "preference is null or not live");
  if (requestedAlgoCount <= 0) return emu::Fail(CUBLAS_STATUS_INVALID_VALUE, kFn, "requestedAlgoCount <= 0");
  if (heuristicResultsArray == nullptr || returnAlgoCount == nullptr) {
    return emu::Fail(CUBLAS_STATUS_INVALID_VALUE, kFn, "heuristicResultsArray or returnAlgoCount is null");
  }
  emu::Problem problem;
  if (const cublasStatus_t s = emu::CheckProblem(kFn, *d, *a, *b, *c, *dd, &problem); s != CUBLAS_STATUS_SUCCESS) return s;

  cublasLtMatmulHeuristicResult_t& r = heuristicResultsArray[0];
  r = cublasLtMatmulHeuristicResult_t{};
  // The algorithm needs what the preference promised (at least an element's alignment): a real
  // kernel picked for 16-byte alignment issues vector loads that fault on a 4-byte-aligned pointer.
  const emu::Layout* layouts[4] = {a, b, c, dd};
  uint64_t align = 0;
  for (int i = 0; i < 4; ++i) {
    const uint32_t need = std::max<uint32_t>(emu::PowerOfTwoAlignment(pref->align[i]),
                                             static_cast<uint32_t>(emu::ElementBytes(layouts[i]->type)));
    align |= uint64_t{need} << (16 * i);
  }
  r.algo.data[emu::kSlotMagic] = emu::kAlgoMagic;
  r.algo.data[emu::kSlotAlign] = align;
  // cuBLASLt reads the bias pointer's value here to choose the bias loads' alignment.
  r.algo.data[emu::kSlotBiasAlign] =
      problem.bias ? std::max<uint32_t>(emu::PowerOfTwoAlignment(reinterpret_cast<uintptr_t>(d->bias)),
                                        static_cast<uint32_t>(emu::ElementBytes(problem.bias_type)))
                   : 0;
  r.algo.data[emu::kSlotWorkspace] = pref->max_workspace;
  r.algo.data[emu::kSlotConfig] = emu::ConfigFingerprint(*d, *a, *c, problem);
  r.workspaceSize = 0;
  r.state = CUBLAS_STATUS_SUCCESS;
  r.wavesCount = 1.0f;
  *returnAlgoCount = 1;
  return CUBLAS_STATUS_SUCCESS;
}

// ---- matmul ------------------------------------------------------------------------------------------------
cublasStatus_t CUBLASWINAPI cublasLtMatmul(cublasLtHandle_t lightHandle, cublasLtMatmulDesc_t computeDesc,
                                           const void* alpha, const void* A, cublasLtMatrixLayout_t Adesc,
                                           const void* B, cublasLtMatrixLayout_t Bdesc, const void* beta,
                                           const void* C, cublasLtMatrixLayout_t Cdesc, void* D,
                                           cublasLtMatrixLayout_t Ddesc, const cublasLtMatmulAlgo_t* algo,
                                           void* workspace, size_t workspaceSizeInBytes, cudaStream_t stream) {
  constexpr const char* kFn = "cublasLtMatmul";
  if (lightHandle == nullptr || lightHandle->magic != emu::kHandleMagic) {
    return emu::Fail(CUBLAS_STATUS_NOT_INITIALIZED, kFn, "the handle is null or not a live cuBLASLt handle");
  }
  const emu::MatmulDesc* desc = emu::AsDesc(computeDesc);
  const emu::Layout *la = emu::AsLayout(Adesc), *lb = emu::AsLayout(Bdesc), *lc = emu::AsLayout(Cdesc),
                    *ld = emu::AsLayout(Ddesc);
  if (desc == nullptr || desc->magic != emu::kDescMagic) return emu::Fail(CUBLAS_STATUS_INVALID_VALUE, kFn, "computeDesc is null or not live");
  for (const auto& [l, name] : {std::pair{la, "Adesc"}, std::pair{lb, "Bdesc"}, std::pair{lc, "Cdesc"}, std::pair{ld, "Ddesc"}}) {
    if (l == nullptr || l->magic != emu::kLayoutMagic) {
      return emu::Fail(CUBLAS_STATUS_INVALID_VALUE, kFn, std::string(name) + " is null or not a live matrix layout");
    }
  }
  emu::Problem p;
  if (const cublasStatus_t s = emu::CheckProblem(kFn, *desc, *la, *lb, *lc, *ld, &p); s != CUBLAS_STATUS_SUCCESS) return s;
  if (alpha == nullptr || beta == nullptr) return emu::Fail(CUBLAS_STATUS_INVALID_VALUE, kFn, "alpha or beta is null");
  if (algo == nullptr || algo->data[emu::kSlotMagic] != emu::kAlgoMagic) {
    return emu::Fail(CUBLAS_STATUS_INVALID_VALUE, kFn, "algo is null or was not obtained from cublasLtMatmulAlgoGetHeuristic");
  }
  if (algo->data[emu::kSlotConfig] != emu::ConfigFingerprint(*desc, *la, *lc, p)) {
    return emu::Fail(CUBLAS_STATUS_INVALID_VALUE, kFn,
                     "algo was chosen for other types, transposes or epilogue than this descriptor and these layouts");
  }
  if (workspaceSizeInBytes > algo->data[emu::kSlotWorkspace]) {
    return emu::Fail(CUBLAS_STATUS_INVALID_VALUE, kFn,
                     "workspaceSizeInBytes " + std::to_string(workspaceSizeInBytes) +
                         " is larger than the preference's MAX_WORKSPACE_BYTES " +
                         std::to_string(algo->data[emu::kSlotWorkspace]) + " the algo was chosen for");
  }
  if (p.bias && desc->bias == nullptr) return emu::Fail(CUBLAS_STATUS_INVALID_VALUE, kFn, "epilogue BIAS with a null BIAS_POINTER");

  const float alpha_v = *static_cast<const float*>(alpha);
  const float beta_v = *static_cast<const float*>(beta);
  const bool reads_c = beta_v != 0.0f;
  const size_t ea = emu::ElementBytes(la->type), eb = emu::ElementBytes(lb->type), ec = emu::ElementBytes(lc->type),
               ed = emu::ElementBytes(ld->type), ebias = emu::ElementBytes(p.bias_type);
  const size_t a_bytes = emu::ExtentElements(*la) * ea, b_bytes = emu::ExtentElements(*lb) * eb,
               c_bytes = reads_c ? emu::ExtentElements(*lc) * ec : 0, d_bytes = emu::ExtentElements(*ld) * ed;
  const size_t bias_bytes =
      p.bias && p.m > 0 ? ((p.batch - 1) * desc->bias_batch_stride + p.m) * ebias : 0;

  // In place (C == D) cuBLASLt needs C and D laid out identically; an out-of-place D that
  // overlaps an input is a read/write race on a GPU.
  if (C == D && reads_c && (lc->ld != ld->ld || lc->batch_stride != ld->batch_stride)) {
    return emu::Fail(CUBLAS_STATUS_INVALID_VALUE, kFn,
                     "C == D in place, but " + emu::Describe("C", *lc) + " and " + emu::Describe("D", *ld) +
                         " differ in ld or batch stride");
  }
  for (const auto& [q, q_bytes, name] : {std::tuple{A, a_bytes, "A"}, std::tuple{B, b_bytes, "B"},
                                        std::tuple{desc->bias, bias_bytes, "bias"},
                                        std::tuple{C != D ? C : nullptr, c_bytes, "C"}}) {
    if (emu::Overlap(D, d_bytes, q, q_bytes)) {
      return emu::Fail(CUBLAS_STATUS_INVALID_VALUE, kFn, std::string("D (") + emu::Hex(D) + ", " + std::to_string(d_bytes) +
                                                             " bytes) overlaps " + name + " (" + emu::Hex(q) + ", " +
                                                             std::to_string(q_bytes) + " bytes)");
    }
  }

  if (const cudaError_t sticky = emu::StickyError(); sticky != cudaSuccess) {
    return emu::Fail(CUBLAS_STATUS_EXECUTION_FAILED, kFn,
                     std::string("the context has a sticky error (") + cudaGetErrorName(sticky) + "): nothing runs");
  }

  // Every byte the kernel would touch must lie in one live device allocation.
  const std::tuple<const void*, size_t, const char*> ranges[] = {
      {A, a_bytes, "cublasLtMatmul A"}, {B, b_bytes, "cublasLtMatmul B"},
      {C, c_bytes, "cublasLtMatmul C"}, {D, d_bytes, "cublasLtMatmul D"},
      {desc->bias, bias_bytes, "cublasLtMatmul bias"},
      {workspace, workspace != nullptr ? workspaceSizeInBytes : 0, "cublasLtMatmul workspace"}};
  for (const auto& [ptr, bytes, what] : ranges) {
    if (bytes == 0) continue;
    if (std::string msg = emu::CheckDeviceRange(ptr, bytes, what); !msg.empty()) {
      std::fprintf(stderr, "emulated %s\n", msg.c_str());
      emu::RecordError(cudaErrorIllegalAddress, msg, /*sticky=*/true);
      return CUBLAS_STATUS_EXECUTION_FAILED;
    }
  }
  const uint64_t align = algo->data[emu::kSlotAlign];
  const std::tuple<const void*, size_t, uint32_t, const char*> aligned[] = {
      {A, a_bytes, uint32_t(align & 0xffff), "A"},
      {B, b_bytes, uint32_t((align >> 16) & 0xffff), "B"},
      {C, c_bytes, uint32_t((align >> 32) & 0xffff), "C"},
      {D, d_bytes, uint32_t((align >> 48) & 0xffff), "D"},
      {desc->bias, bias_bytes, uint32_t(algo->data[emu::kSlotBiasAlign]), "bias"}};
  for (const auto& [ptr, bytes, need, what] : aligned) {
    if (bytes == 0 || need == 0 || reinterpret_cast<uintptr_t>(ptr) % need == 0) continue;
    const std::string msg = std::string(kFn) + " " + what + " " + emu::Hex(ptr) + " is not " +
                            std::to_string(need) + "-byte aligned, as the algo was chosen for (MIN_ALIGNMENT preference)";
    std::fprintf(stderr, "emulated %s\n", msg.c_str());
    emu::RecordError(cudaErrorMisalignedAddress, msg, /*sticky=*/true);
    return CUBLAS_STATUS_EXECUTION_FAILED;
  }

  emu::TraceRecord record;
  record.kind = emu::TraceRecord::kGemm;
  record.name = "gemm";
  record.site = "";
  record.m = p.m;
  record.n = p.n;
  record.k = p.k;
  record.batch = p.batch;
  record.types = std::string("A=") + emu::TypeName(la->type) + " B=" + emu::TypeName(lb->type) +
                 (reads_c ? std::string(" C=") + emu::TypeName(lc->type) : std::string()) +
                 " D=" + emu::TypeName(ld->type) + " compute=" + emu::ComputeName(desc->compute) +
                 " epilogue=" + (p.bias ? "BIAS" : "DEFAULT");
  const double items = static_cast<double>(p.batch);
  record.cost.flops = 2.0 * p.m * p.n * p.k * items;
  record.cost.bytes = items * (double(p.m) * p.k * ea + double(p.k) * p.n * eb + double(p.m) * p.n * ed +
                               (reads_c ? double(p.m) * p.n * ec : 0.0) + (p.bias ? double(p.m) * ebias : 0.0));
  emu::Trace(std::move(record));

  if (emu::DryRun() || p.m == 0 || p.n == 0) return CUBLAS_STATUS_SUCCESS;
  emu::Compute(p, *la, *lb, *lc, *ld, desc->bias_batch_stride,
               emu::Operands{A, B, reads_c ? C : nullptr, p.bias ? desc->bias : nullptr, D, alpha_v, beta_v});
  return CUBLAS_STATUS_SUCCESS;
}
