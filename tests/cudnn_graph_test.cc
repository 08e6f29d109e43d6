// cuDNN attention (engine/cuda/cudnn_attention.h). Without a GPU: the layouts' validation,
// the device description (engine/cuda/devices/h200.json) and, for test shapes and the paper's
// shapes (examples/paper-*.yaml), forward and backward graphs that finalize, heuristics that
// offer engines, and plans that compile (plan_compiled_but_no_driver: NVRTC ran, only the
// stub driver's module load failed); graphs cuDNN or Validate must refuse, refused with the
// reason. On a GPU: forward and backward against a float64 reference of causal GQA
// attention, and a deterministic backward that gives the same bits twice.
#include <cuda_runtime.h>
#include <cudnn_graph.h>
#include <dlfcn.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <ostream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "engine/bf16.h"
#include "engine/cuda/cudnn_attention.h"

namespace sinkscope::cuda {
namespace {

// The source tree: where this binary was built, or $SINKSCOPE_SOURCE_DIR (a copy of the
// tree on a GPU machine, scripts/gpu/run.sh).
std::string SourceDir() {
  const char* env = std::getenv("SINKSCOPE_SOURCE_DIR");
  return env != nullptr && env[0] != '\0' ? env : SINKSCOPE_SOURCE_DIR;
}

using ::testing::AnyOf;
using ::testing::HasSubstr;
using ::testing::Not;

// cuDNN judges engines only when it can load some libcuda.so.1, even against a device
// description (without one every config is dropped: "this->libcuda == nullptr"). On a
// machine with no driver the toolkit's stub serves: its soname is libcuda.so.1, so once it
// is loaded by path, cuDNN's and the CUDA runtime's own dlopen("libcuda.so.1") find it.
// A real driver, where there is one, is always preferred.
class CudaDriverEnvironment : public ::testing::Environment {
 public:
  void SetUp() override {
    if (dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL) != nullptr) return;
    std::vector<std::string> stubs;
    Dl_info info;
    if (dladdr(reinterpret_cast<void*>(&cudaGetDeviceCount), &info) != 0 && info.dli_fname != nullptr) {
      const std::string runtime = info.dli_fname;  // .../lib/libcudart.so.13: the stub is in .../lib/stubs
      stubs.push_back(runtime.substr(0, runtime.rfind('/')) + "/stubs/libcuda.so");
    }
    stubs.push_back("/usr/local/cuda/lib64/stubs/libcuda.so");
    for (const std::string& stub : stubs) {
      if (dlopen(stub.c_str(), RTLD_NOW | RTLD_GLOBAL) != nullptr) {
        std::fprintf(stderr, "[cudnn_graph_test] no CUDA driver here: using the toolkit's stub %s\n", stub.c_str());
        return;
      }
    }
  }
};
const ::testing::Environment* const kDriver = ::testing::AddGlobalTestEnvironment(new CudaDriverEnvironment);

int Devices() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

const std::string& H200Json() {
  static const std::string json = ReadFile(SourceDir() + "/engine/cuda/devices/h200.json");
  return json;
}

std::string WithDeviceVer(int device_ver) {
  std::string json = H200Json();
  const std::string key = "\"deviceVer\":900";
  json.replace(json.find(key), key.size(), "\"deviceVer\":" + std::to_string(device_ver));
  return json;
}

// ---------------------------------------------------------------------------------------
// Layouts.

TEST(CudnnAttentionLayoutTest, PackedQkvStridesAreTheQkvWidth) {
  const AttentionLayout l = AttentionLayout::PackedQkv(4, 1024, 8, 2, 64);
  EXPECT_EQ(l.q_row_stride, (8 + 2 * 2) * 64);
  EXPECT_EQ(l.k_row_stride, l.q_row_stride);
  EXPECT_EQ(l.v_row_stride, l.q_row_stride);
  EXPECT_EQ(l.dk_row_stride, l.q_row_stride);
  EXPECT_EQ(l.o_row_stride, 8 * 64);
  EXPECT_EQ(l.do_row_stride, 8 * 64);
  EXPECT_TRUE(Validate(l).ok());
  const AttentionLayout s = AttentionLayout::Separate(2, 128, 4, 2, 32);
  EXPECT_EQ(s.q_row_stride, 128);
  EXPECT_EQ(s.k_row_stride, 64);
  EXPECT_EQ(s.dv_row_stride, 64);
  EXPECT_TRUE(Validate(s).ok());
}

TEST(CudnnAttentionLayoutTest, ValidateNamesTheField) {
  struct Case {
    AttentionLayout layout;
    AttentionPass pass;
    std::string message;
  };
  AttentionLayout narrow_q = AttentionLayout::Separate(2, 128, 4, 2, 32);
  narrow_q.q_row_stride = 64;
  AttentionLayout odd_k = AttentionLayout::Separate(2, 128, 4, 2, 32);
  odd_k.k_row_stride = 68;
  AttentionLayout narrow_dv = AttentionLayout::Separate(2, 128, 4, 2, 32);
  narrow_dv.dv_row_stride = 32;
  const std::vector<Case> cases = {
      {AttentionLayout::Separate(2, 128, 4, 2, 264), AttentionPass::kForward, "head_dim = 264 exceeds 256"},
      {AttentionLayout::Separate(2, 128, 4, 3, 32), AttentionPass::kForward,
       "heads (4) must be a multiple of kv_heads (3)"},
      {AttentionLayout::Separate(2, 128, 4, 2, 36), AttentionPass::kForward, "head_dim = 36 must be a multiple of 8"},
      {AttentionLayout::Separate(2, 1, 4, 2, 32), AttentionPass::kBackward, "tokens = 1: cuDNN's attention backward"},
      {AttentionLayout::Separate(0, 128, 4, 2, 32), AttentionPass::kForward, "batch = 0 must be at least 1"},
      {narrow_q, AttentionPass::kForward, "q_row_stride = 64 is less than the tensor's width 128"},
      {odd_k, AttentionPass::kForward, "k_row_stride = 68 is not a multiple of 8"},
      {narrow_dv, AttentionPass::kBackward, "dv_row_stride = 32 is less than the tensor's width 64"},
  };
  for (const Case& c : cases) {
    const Status s = Validate(c.layout, c.pass);
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << c.message;
    EXPECT_THAT(s.message(), HasSubstr(c.message));
  }
  // What only the backward needs is no error for the forward.
  EXPECT_TRUE(Validate(AttentionLayout::Separate(2, 1, 4, 2, 32), AttentionPass::kForward).ok());
  EXPECT_TRUE(Validate(narrow_dv, AttentionPass::kForward).ok());
}

// ---------------------------------------------------------------------------------------
// The device description.

TEST(CudnnDeviceTest, TheH200DescriptionFinalizesAndReadsBack) {
  StatusOr<DeviceTarget> target = DeviceTarget::FromJson(H200Json());
  ASSERT_TRUE(target.ok()) << target.status().ToString();
  EXPECT_FALSE(target->has_device());
  StatusOr<std::string> json = target->DescriptionJson();
  ASSERT_TRUE(json.ok()) << json.status().ToString();
  EXPECT_THAT(*json, HasSubstr("\"deviceName\":\"NVIDIA H200\""));
  EXPECT_THAT(*json, HasSubstr("\"deviceVer\":900"));
  EXPECT_THAT(*json, HasSubstr("\"multiProcessorCount\":132"));
}

TEST(CudnnDeviceTest, AMissingKeyIsNamed) {
  std::string json = H200Json();
  const std::string entry = "\"smClockRateKHz\":1980000,";
  ASSERT_NE(json.find(entry), std::string::npos);
  json.erase(json.find(entry), entry.size());
  const Status s = DeviceTarget::FromJson(json).status();
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  EXPECT_THAT(s.message(), HasSubstr("missing key \"smClockRateKHz\""));
  EXPECT_THAT(s.message(), HasSubstr("!json_object.HasMember(key)"));  // cuDNN's own words
}

TEST(CudnnDeviceTest, ABooleanMustBeAnInteger) {
  std::string json = H200Json();
  const std::string entry = "\"isTccDriver\":0";
  json.replace(json.find(entry), entry.size(), "\"isTccDriver\":false");
  EXPECT_THAT(DeviceTarget::FromJson(json).status().message(), HasSubstr("booleans must be the integers 0 or 1"));
  EXPECT_THAT(DeviceTarget::FromJson("{not json").status().message(), HasSubstr("not a JSON object"));
}

TEST(CudnnDeviceTest, DeviceVerIsMajorTimesHundredPlusMinorTimesTen) {
  // sm_90 is 900: Hopper's engines are offered for it and not for 800 (Ampere), and "90"
  // is no architecture cuDNN knows.
  const AttentionLayout l = AttentionLayout::Separate(2, 128, 4, 2, 32);
  StatusOr<GraphCheck> hopper = CheckAttentionGraphs(l, WithDeviceVer(900));
  StatusOr<GraphCheck> ampere = CheckAttentionGraphs(l, WithDeviceVer(800));
  ASSERT_TRUE(hopper.ok()) << hopper.status().ToString();
  ASSERT_TRUE(ampere.ok()) << ampere.status().ToString();
  std::printf("deviceVer 900: %s\ndeviceVer 800: %s\n", hopper->ToString().c_str(), ampere->ToString().c_str());
  auto offered = [](const PassCheck& p) {
    std::vector<int64_t> all = p.mode_a_engines;
    all.insert(all.end(), p.fallback_engines.begin(), p.fallback_engines.end());
    return all;
  };
  for (auto pass : {&GraphCheck::forward, &GraphCheck::backward}) {
    const std::vector<int64_t> at_800 = offered((*ampere).*pass);
    EXPECT_THAT(at_800, Not(::testing::Contains(((*hopper).*pass).engine)))
        << "the engine chosen for sm_90 is offered for sm_80 too";
  }
  const Status not_an_arch = DeviceTarget::FromJson(WithDeviceVer(90)).status();
  EXPECT_THAT(not_an_arch.message(), HasSubstr("CUDNN_STATUS_NOT_SUPPORTED_ARCH_MISMATCH"));
}

TEST(CudnnDeviceTest, DescribeDeviceNeedsAHandle) {
  EXPECT_EQ(DescribeDevice(nullptr).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(DeviceTarget::FromHandle(nullptr).status().code(), StatusCode::kInvalidArgument);
  StatusOr<DeviceTarget> description = DeviceTarget::FromJson(H200Json());
  ASSERT_TRUE(description.ok());
  const Status s = CudnnAttention::Build(*description, AttentionLayout::Separate(2, 128, 4, 2, 32)).status();
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition);
  EXPECT_THAT(s.message(), HasSubstr("needs a device"));
}

TEST(CudnnDeviceTest, TheVersionIsTheLibrarys) {
  EXPECT_EQ(CudnnVersion(), static_cast<int64_t>(cudnnGetVersion()));
  EXPECT_THAT(CudnnVersionString(), ::testing::StartsWith("9."));
}

// ---------------------------------------------------------------------------------------
// Graphs, heuristics and plans against the H200 description.

// The fields of examples/paper-*.yaml a layout needs (each key occurs once in the file).
std::map<std::string, int64_t> PaperModel(const std::string& name) {
  std::map<std::string, int64_t> fields;
  std::istringstream in(ReadFile(SourceDir() + "/examples/paper-" + name + ".yaml"));
  for (std::string line; std::getline(in, line);) {
    const size_t colon = line.find(':');
    if (colon == std::string::npos) continue;
    const std::string key = line.substr(line.find_first_not_of(' '), colon - line.find_first_not_of(' '));
    if (key == "heads" || key == "kv_heads" || key == "head_dim" || key == "context" || key == "micro_batch") {
      fields[key] = std::atoll(line.c_str() + colon + 1);
    }
  }
  return fields;
}

AttentionLayout PaperLayout(const std::string& name, bool deterministic) {
  std::map<std::string, int64_t> m = PaperModel(name);
  return AttentionLayout::PackedQkv(m["micro_batch"], m["context"], m["heads"], m["kv_heads"], m["head_dim"],
                                    deterministic);
}

TEST(CudnnGraphTest, ThePaperShapesAreReadFromTheExamples) {
  const AttentionLayout small = PaperLayout("0.1b", false);
  EXPECT_EQ(small.batch, 16);
  EXPECT_EQ(small.tokens, 1024);
  EXPECT_EQ(small.heads, 8);
  EXPECT_EQ(small.kv_heads, 8);
  EXPECT_EQ(small.head_dim, 64);
  const AttentionLayout large = PaperLayout("1b", false);
  EXPECT_EQ(large.tokens, 2048);
  EXPECT_EQ(large.heads, 16);
  EXPECT_EQ(large.kv_heads, 8);
  EXPECT_EQ(large.head_dim, 128);
}

struct Shape {
  std::string name;
  AttentionLayout layout;
};
// The layout, not its bytes, in test listings (ctest's test names show the parameter).
void PrintTo(const Shape& shape, std::ostream* out) { *out << shape.layout.ToString(); }

std::vector<Shape> Shapes() {
  return {
      {"separate_b2_t128_h4_kv2_dh32", AttentionLayout::Separate(2, 128, 4, 2, 32)},
      {"separate_b2_t128_h4_kv2_dh32_deterministic", AttentionLayout::Separate(2, 128, 4, 2, 32, true)},
      {"packed_b4_t1024_h8_kv2_dh64", AttentionLayout::PackedQkv(4, 1024, 8, 2, 64)},
      {"packed_b4_t1024_h8_kv2_dh64_deterministic", AttentionLayout::PackedQkv(4, 1024, 8, 2, 64, true)},
      {"paper_0_1b", PaperLayout("0.1b", false)},
      {"paper_0_3b", PaperLayout("0.3b", false)},
      {"paper_1b", PaperLayout("1b", false)},
      {"paper_1b_deterministic", PaperLayout("1b", true)},
  };
}

class CudnnGraphShapeTest : public ::testing::TestWithParam<Shape> {};

TEST_P(CudnnGraphShapeTest, GraphsFinalizeEnginesAreOfferedPlansCompile) {
  const AttentionLayout& l = GetParam().layout;
  StatusOr<GraphCheck> check = CheckAttentionGraphs(l, H200Json());
  ASSERT_TRUE(check.ok()) << check.status().ToString();
  std::printf("%s: %s\n", l.ToString().c_str(), check->ToString().c_str());
  const bool device = Devices() > 0;
  for (const PassCheck* p : {&check->forward, &check->backward}) {
    EXPECT_FALSE(p->mode_a_engines.empty() && p->fallback_engines.empty());
    EXPECT_GE(p->engine, 0);
    EXPECT_GE(p->workspace_bytes, 0);
    if (!device) {
      // The stub driver: NVRTC compiled the kernels, loading them failed, nothing else.
      EXPECT_EQ(p->outcome, PlanOutcome::kCompiledButNoDriver) << p->detail;
      EXPECT_THAT(p->detail, HasSubstr("cuLibraryLoadData returned error  (34)"));
    } else {
      EXPECT_THAT(p->outcome, AnyOf(PlanOutcome::kFinalized, PlanOutcome::kCompiledButNoDriver));
    }
  }
  if (l.deterministic) {
    // The deterministic backward computes dQ in its own pass from a dP buffer in the
    // workspace, B·H·T²·2 bytes (CUDA.md §2), instead of atomics into dQ_accum.
    EXPECT_GE(check->backward.workspace_bytes, 2 * l.batch * l.heads * l.tokens * l.tokens);
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudnnGraphShapeTest, ::testing::ValuesIn(Shapes()),
                         [](const ::testing::TestParamInfo<Shape>& info) { return info.param.name; });

TEST(CudnnGraphTest, HeadDim264IsRefused) {
  StatusOr<GraphCheck> check = CheckAttentionGraphs(AttentionLayout::Separate(2, 128, 4, 2, 264), H200Json());
  EXPECT_EQ(check.status().code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(check.status().message(), HasSubstr("head_dim = 264 exceeds 256"));
}

TEST(CudnnGraphTest, CudnnItselfRefusesHeadDim264InTheBackward) {
  // Past Validate, cuDNN 9.19's own support checks: the forward still finds an engine, the
  // backward none, and the heuristics' reasons come back in the error.
  StatusOr<DeviceTarget> target = DeviceTarget::FromJson(H200Json());
  ASSERT_TRUE(target.ok());
  const Status s = CheckAttentionGraphs(AttentionLayout::Separate(2, 128, 4, 2, 264), *target, false).status();
  EXPECT_EQ(s.code(), StatusCode::kUnimplemented) << s.ToString();
  EXPECT_THAT(s.message(), HasSubstr("backward: the heuristics offered no engine for this graph"));
  EXPECT_THAT(s.message(), HasSubstr("d_qk > 256"));
  EXPECT_THAT(s.message(), Not(HasSubstr("plan_compiled_but_no_driver")));
}

TEST(CudnnGraphTest, ACacheWithoutADeviceBuildsNothing) {
  StatusOr<DeviceTarget> target = DeviceTarget::FromJson(H200Json());
  ASSERT_TRUE(target.ok());
  CudnnAttentionCache cache(*target);
  EXPECT_EQ(cache.Get(AttentionLayout::Separate(2, 128, 4, 2, 32)).status().code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(cache.size(), 0u);  // a failed build is not cached
}

TEST(CudnnGraphTest, BadLayoutsAreRefusedBeforeCudnn) {
  EXPECT_THAT(CheckAttentionGraphs(AttentionLayout::Separate(2, 128, 6, 4, 32), H200Json()).status().message(),
              HasSubstr("heads (6) must be a multiple of kv_heads (4)"));
  EXPECT_THAT(CheckAttentionGraphs(AttentionLayout::Separate(2, 128, 4, 2, 20), H200Json()).status().message(),
              HasSubstr("head_dim = 20 must be a multiple of 8"));
  EXPECT_THAT(CheckAttentionGraphs(AttentionLayout::Separate(2, 1, 4, 2, 32), H200Json()).status().message(),
              HasSubstr("tokens = 1: cuDNN's attention backward needs at least 2"));
}

TEST(CudnnGraphTest, AMalformedDescriptionIsRefusedNamingTheKey) {
  std::string json = H200Json();
  const std::string entry = ",\"warpSize\":32";
  json.erase(json.find(entry), entry.size());
  const Status s = CheckAttentionGraphs(AttentionLayout::Separate(2, 128, 4, 2, 32), json).status();
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("missing key \"warpSize\""));
}

// ---------------------------------------------------------------------------------------
// On a GPU.

template <typename T>
struct DeviceBuffer {
  T* data = nullptr;
  size_t count = 0;
  explicit DeviceBuffer(size_t n) : count(n) {
    if (n > 0 && cudaMalloc(&data, n * sizeof(T)) != cudaSuccess) data = nullptr;
  }
  ~DeviceBuffer() { cudaFree(data); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void Upload(const std::vector<T>& host) {
    ASSERT_EQ(cudaMemcpy(data, host.data(), count * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  }
  std::vector<T> Download() const {
    std::vector<T> host(count);
    EXPECT_EQ(cudaMemcpy(host.data(), data, count * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
    return host;
  }
};

class Gpu {
 public:
  Gpu() {
    if (cudaSetDevice(0) != cudaSuccess || cudnnCreate(&handle_) != CUDNN_STATUS_SUCCESS) handle_ = nullptr;
    if (handle_ != nullptr && cudaStreamCreate(&stream_) != cudaSuccess) stream_ = nullptr;
  }
  ~Gpu() {
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
    if (handle_ != nullptr) cudnnDestroy(handle_);
  }
  cudnnHandle_t handle() const { return handle_; }
  cudaStream_t stream() const { return stream_; }

 private:
  cudnnHandle_t handle_ = nullptr;
  cudaStream_t stream_ = nullptr;
};

// One problem's buffers, host and device. q, k, v (and dq, dk, dv) live in one packed
// buffer or in three, as the layout says; `*_offset` is each tensor's first element.
struct Problem {
  AttentionLayout l;
  bool packed;
  size_t q_offset = 0, k_offset = 0, v_offset = 0;
  std::vector<uint16_t> qkv, d_o;  // bf16 bits; qkv holds q, k, v at their offsets
  size_t qkv_count = 0;

  Problem(const AttentionLayout& layout, bool packed_qkv, uint32_t seed) : l(layout), packed(packed_qkv) {
    const size_t tokens = static_cast<size_t>(l.batch * l.tokens);
    if (packed) {
      k_offset = static_cast<size_t>(l.heads * l.head_dim);
      v_offset = k_offset + static_cast<size_t>(l.kv_heads * l.head_dim);
      qkv_count = tokens * static_cast<size_t>(l.q_row_stride);
    } else {
      k_offset = tokens * static_cast<size_t>(l.q_row_stride);
      v_offset = k_offset + tokens * static_cast<size_t>(l.k_row_stride);
      qkv_count = v_offset + tokens * static_cast<size_t>(l.v_row_stride);
    }
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> uniform(-1.f, 1.f);
    qkv.resize(qkv_count);
    for (uint16_t& x : qkv) x = FloatToBf16Bits(uniform(rng));
    d_o.resize(tokens * static_cast<size_t>(l.do_row_stride));
    for (uint16_t& x : d_o) x = FloatToBf16Bits(uniform(rng));
  }
  size_t Index(size_t offset, int64_t row_stride, int64_t b, int64_t t, int64_t h, int64_t j) const {
    return offset + static_cast<size_t>((b * l.tokens + t) * row_stride + h * l.head_dim + j);
  }
  double Q(int64_t b, int64_t t, int64_t h, int64_t j) const {
    return Bf16BitsToFloat(qkv[Index(q_offset, l.q_row_stride, b, t, h, j)]);
  }
  double K(int64_t b, int64_t t, int64_t h, int64_t j) const {
    return Bf16BitsToFloat(qkv[Index(k_offset, l.k_row_stride, b, t, h, j)]);
  }
  double V(int64_t b, int64_t t, int64_t h, int64_t j) const {
    return Bf16BitsToFloat(qkv[Index(v_offset, l.v_row_stride, b, t, h, j)]);
  }
  double DO(int64_t b, int64_t t, int64_t h, int64_t j) const {
    return Bf16BitsToFloat(d_o[Index(0, l.do_row_stride, b, t, h, j)]);
  }
};

// Causal GQA attention in float64 from the bf16 inputs: the textbook formulas, row by row.
// Query head h reads KV head h / (H/KV). Outputs (B,T,H,dh), (B,H,T) and (B,T,KV,dh), packed.
struct Reference {
  std::vector<double> o, stats, dq, dk, dv;
};

Reference ReferenceAttention(const Problem& p) {
  const AttentionLayout& l = p.l;
  const int64_t B = l.batch, T = l.tokens, H = l.heads, KV = l.kv_heads, dh = l.head_dim, group = H / KV;
  const double scale = 1.0 / std::sqrt(static_cast<double>(dh));
  Reference r;
  r.o.assign(B * T * H * dh, 0);
  r.stats.assign(B * H * T, 0);
  r.dq.assign(B * T * H * dh, 0);
  r.dk.assign(B * T * KV * dh, 0);
  r.dv.assign(B * T * KV * dh, 0);
  std::vector<double> s(T), dp(T);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      const int64_t g = h / group;
      for (int64_t t = 0; t < T; ++t) {
        double m = -INFINITY;
        for (int64_t u = 0; u <= t; ++u) {
          double dot = 0;
          for (int64_t j = 0; j < dh; ++j) dot += p.Q(b, t, h, j) * p.K(b, u, g, j);
          s[u] = dot * scale;
          m = std::max(m, s[u]);
        }
        double z = 0;
        for (int64_t u = 0; u <= t; ++u) z += std::exp(s[u] - m);
        const double lse = m + std::log(z);
        r.stats[(b * H + h) * T + t] = lse;
        double* o = &r.o[((b * T + t) * H + h) * dh];
        for (int64_t u = 0; u <= t; ++u) {
          const double a = std::exp(s[u] - lse);
          for (int64_t j = 0; j < dh; ++j) o[j] += a * p.V(b, u, g, j);
        }
        // Backward: D = dO·O, dS_u = a_u (dO·v_u − D), then dq, dk, dv.
        double d = 0;
        for (int64_t j = 0; j < dh; ++j) d += p.DO(b, t, h, j) * o[j];
        for (int64_t u = 0; u <= t; ++u) {
          const double a = std::exp(s[u] - lse);
          double dov = 0;
          for (int64_t j = 0; j < dh; ++j) dov += p.DO(b, t, h, j) * p.V(b, u, g, j);
          const double ds = a * (dov - d) * scale;
          for (int64_t j = 0; j < dh; ++j) {
            r.dq[((b * T + t) * H + h) * dh + j] += ds * p.K(b, u, g, j);
            r.dk[((b * T + u) * KV + g) * dh + j] += ds * p.Q(b, t, h, j);
            r.dv[((b * T + u) * KV + g) * dh + j] += a * p.DO(b, t, h, j);
          }
        }
      }
    }
  }
  return r;
}

// max |got − want| / max |want|; NaN anywhere gives +inf, so it never passes.
double NormalisedError(const std::vector<double>& got, const std::vector<double>& want) {
  double error = 0, scale = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (!std::isfinite(got[i])) return INFINITY;
    error = std::max(error, std::abs(got[i] - want[i]));
    scale = std::max(scale, std::abs(want[i]));
  }
  return error / std::max(scale, 1e-30);
}

struct GpuResult {
  std::vector<double> o, stats, dq, dk, dv;  // packed as Reference's
  std::vector<uint16_t> dq_bits, dk_bits, dv_bits;
};

// Runs forward then backward on the GPU; the results gathered into Reference's layouts.
GpuResult RunOnGpu(const Gpu& gpu, const CudnnAttention& attention, const Problem& p, int backward_runs = 1,
                   std::vector<std::vector<uint16_t>>* every_run_grads = nullptr) {
  const AttentionLayout& l = p.l;
  const int64_t B = l.batch, T = l.tokens, H = l.heads, KV = l.kv_heads, dh = l.head_dim;
  const size_t tokens = static_cast<size_t>(B * T);
  DeviceBuffer<uint16_t> qkv(p.qkv_count), dqkv(p.qkv_count), o(tokens * l.o_row_stride), d_o(p.d_o.size());
  DeviceBuffer<float> stats(B * H * T), scratch(attention.backward_scratch_floats());
  DeviceBuffer<uint8_t> workspace(std::max(attention.forward_workspace_bytes(), attention.backward_workspace_bytes()));
  GpuResult r;
  if (qkv.data == nullptr || dqkv.data == nullptr || o.data == nullptr || stats.data == nullptr) {
    ADD_FAILURE() << "cudaMalloc failed";
    return r;
  }
  qkv.Upload(p.qkv);
  d_o.Upload(p.d_o);
  EXPECT_EQ(cudaMemset(dqkv.data, 0, p.qkv_count * 2), cudaSuccess);
  const uint16_t* base = qkv.data;
  uint16_t* dbase = dqkv.data;
  Status fwd = attention.Forward(gpu.stream(), base + p.q_offset, base + p.k_offset, base + p.v_offset, o.data,
                                 stats.data, workspace.data);
  EXPECT_TRUE(fwd.ok()) << fwd.ToString();
  for (int run = 0; run < backward_runs; ++run) {
    Status bwd = attention.Backward(gpu.stream(), base + p.q_offset, base + p.k_offset, base + p.v_offset, o.data,
                                    d_o.data, stats.data, dbase + p.q_offset, dbase + p.k_offset, dbase + p.v_offset,
                                    workspace.data, scratch.data);
    EXPECT_TRUE(bwd.ok()) << bwd.ToString();
    EXPECT_EQ(cudaStreamSynchronize(gpu.stream()), cudaSuccess);
    if (every_run_grads != nullptr) every_run_grads->push_back(dqkv.Download());
  }
  EXPECT_EQ(cudaStreamSynchronize(gpu.stream()), cudaSuccess);
  const std::vector<uint16_t> o_bits = o.Download(), grads = dqkv.Download();
  const std::vector<float> stats_host = stats.Download();
  r.stats.assign(stats_host.begin(), stats_host.end());
  auto gather = [&](const std::vector<uint16_t>& bits, size_t offset, int64_t row_stride, int64_t heads) {
    std::vector<double> out(B * T * heads * dh);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t)
        for (int64_t h = 0; h < heads; ++h)
          for (int64_t j = 0; j < dh; ++j)
            out[((b * T + t) * heads + h) * dh + j] =
                Bf16BitsToFloat(bits[offset + (b * T + t) * row_stride + h * dh + j]);
    return out;
  };
  r.o = gather(o_bits, 0, l.o_row_stride, H);
  r.dq = gather(grads, p.q_offset, l.dq_row_stride, H);
  r.dk = gather(grads, p.k_offset, l.dk_row_stride, KV);
  r.dv = gather(grads, p.v_offset, l.dv_row_stride, KV);
  return r;
}

struct GpuCase {
  std::string name;
  AttentionLayout layout;
  bool packed;
};
void PrintTo(const GpuCase& c, std::ostream* out) { *out << c.layout.ToString(); }

class CudnnGpuParityTest : public ::testing::TestWithParam<GpuCase> {};

// Tolerances against float64, as normalised max error (max |Δ| / max |ref|): O and the
// gradients are stored in bf16 (2⁻⁹ relative rounding), and P and dS enter the tensor-core
// matmuls in bf16, each product's error summed over up to T terms of both signs: 2e-2 for O
// and 3e-2 for dQ, dK, dV leave room for that and catch any wrong index, mask or scale
// (those give errors of order 1). Stats is fp32 all the way: 2e-3 absolute.
TEST_P(CudnnGpuParityTest, ForwardAndBackwardMatchFloat64) {
  if (Devices() == 0) GTEST_SKIP() << "no CUDA device here (cudaGetDeviceCount reports none): GPU-only test";
  const Gpu gpu;
  ASSERT_NE(gpu.handle(), nullptr) << "cudnnCreate failed";
  StatusOr<DeviceTarget> target = DeviceTarget::FromHandle(gpu.handle());
  ASSERT_TRUE(target.ok());
  const AttentionLayout& l = GetParam().layout;
  StatusOr<std::shared_ptr<const CudnnAttention>> attention = CudnnAttention::Build(*target, l);
  ASSERT_TRUE(attention.ok()) << attention.status().ToString();
  std::printf("%s: forward engine %ld (%zu B workspace), backward engine %ld (%zu B workspace, %zu scratch floats)\n",
              l.ToString().c_str(), static_cast<long>((*attention)->forward_engine()),
              (*attention)->forward_workspace_bytes(), static_cast<long>((*attention)->backward_engine()),
              (*attention)->backward_workspace_bytes(), (*attention)->backward_scratch_floats());
  const Problem problem(l, GetParam().packed, 1234);
  const Reference want = ReferenceAttention(problem);
  const GpuResult got = RunOnGpu(gpu, **attention, problem);
  ASSERT_EQ(got.o.size(), want.o.size());
  double stats_error = 0;
  for (size_t i = 0; i < want.stats.size(); ++i) {
    stats_error =
        std::isfinite(got.stats[i]) ? std::max(stats_error, std::abs(got.stats[i] - want.stats[i])) : INFINITY;
  }
  const double o_error = NormalisedError(got.o, want.o), dq_error = NormalisedError(got.dq, want.dq),
               dk_error = NormalisedError(got.dk, want.dk), dv_error = NormalisedError(got.dv, want.dv);
  std::printf("errors: O %.3g, Stats %.3g (absolute), dQ %.3g, dK %.3g, dV %.3g\n", o_error, stats_error, dq_error,
              dk_error, dv_error);
  EXPECT_LT(o_error, 2e-2);
  EXPECT_LT(stats_error, 2e-3);
  EXPECT_LT(dq_error, 3e-2);
  EXPECT_LT(dk_error, 3e-2);
  EXPECT_LT(dv_error, 3e-2);
}

INSTANTIATE_TEST_SUITE_P(
    Layouts, CudnnGpuParityTest,
    ::testing::Values(GpuCase{"separate_b2_t128_h4_kv2_dh32", AttentionLayout::Separate(2, 128, 4, 2, 32), false},
                      GpuCase{"packed_b1_t256_h8_kv2_dh64_deterministic",
                              AttentionLayout::PackedQkv(1, 256, 8, 2, 64, true), true},
                      GpuCase{"packed_b2_t200_h4_kv4_dh128", AttentionLayout::PackedQkv(2, 200, 4, 4, 128), true}),
    [](const ::testing::TestParamInfo<GpuCase>& info) { return info.param.name; });

TEST(CudnnGpuTest, DeterministicBackwardGivesTheSameBitsTwice) {
  if (Devices() == 0) GTEST_SKIP() << "no CUDA device here (cudaGetDeviceCount reports none): GPU-only test";
  const Gpu gpu;
  ASSERT_NE(gpu.handle(), nullptr);
  StatusOr<DeviceTarget> target = DeviceTarget::FromHandle(gpu.handle());
  ASSERT_TRUE(target.ok());
  // Long enough that dQ gathers many key blocks (where atomics would reorder the sums).
  const AttentionLayout l = AttentionLayout::PackedQkv(2, 1024, 8, 2, 64, true);
  StatusOr<std::shared_ptr<const CudnnAttention>> attention = CudnnAttention::Build(*target, l);
  ASSERT_TRUE(attention.ok()) << attention.status().ToString();
  std::vector<std::vector<uint16_t>> runs;
  RunOnGpu(gpu, **attention, Problem(l, true, 99), 3, &runs);
  ASSERT_EQ(runs.size(), 3u);
  for (size_t i = 1; i < runs.size(); ++i) {
    EXPECT_EQ(std::memcmp(runs[0].data(), runs[i].data(), runs[0].size() * sizeof(uint16_t)), 0)
        << "backward run " << i << " differs from run 0";
  }
}

TEST(CudnnGpuTest, PlansAreCachedByLayoutAndTheRealDeviceIsDescribed) {
  if (Devices() == 0) GTEST_SKIP() << "no CUDA device here (cudaGetDeviceCount reports none): GPU-only test";
  const Gpu gpu;
  ASSERT_NE(gpu.handle(), nullptr);
  StatusOr<DeviceTarget> target = DeviceTarget::FromHandle(gpu.handle());
  ASSERT_TRUE(target.ok());
  CudnnAttentionCache cache(*target);
  const AttentionLayout a = AttentionLayout::Separate(2, 128, 4, 2, 32);
  AttentionLayout b = a;
  b.deterministic = true;
  StatusOr<std::shared_ptr<const CudnnAttention>> first = cache.Get(a), again = cache.Get(a), other = cache.Get(b);
  ASSERT_TRUE(first.ok() && again.ok() && other.ok());
  EXPECT_EQ(first->get(), again->get());
  EXPECT_NE(first->get(), other->get());
  EXPECT_EQ(cache.size(), 2u);
  StatusOr<GraphCheck> check = CheckAttentionGraphs(a, *target);
  ASSERT_TRUE(check.ok()) << check.status().ToString();
  EXPECT_EQ(check->forward.outcome, PlanOutcome::kFinalized);
  EXPECT_EQ(check->backward.outcome, PlanOutcome::kFinalized);

  // The device's own description, for engine/cuda/devices/: written where the GPU script asks.
  StatusOr<std::string> json = DescribeDevice(gpu.handle());
  ASSERT_TRUE(json.ok()) << json.status().ToString();
  EXPECT_THAT(*json, HasSubstr("\"deviceVer\""));
  std::printf("this device: %s\n", json->c_str());
  if (const char* out = std::getenv("SINKSCOPE_DEVICE_JSON_OUT"); out != nullptr && out[0] != '\0') {
    std::ofstream(out) << *json << "\n";
  }
  // And it finalizes as a description again.
  EXPECT_TRUE(DeviceTarget::FromJson(*json).ok());
}

}  // namespace
}  // namespace sinkscope::cuda
