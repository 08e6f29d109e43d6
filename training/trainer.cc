#include "training/trainer.h"

#include <cmath>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <utility>

#include "base/rng.h"

namespace sinkscope {

namespace {

// All-reduces ranges of the gradient on its own thread as the backward hands them over
// (highest offsets first, each adjacent to the one before): adjacent ranges are merged
// until a bucket holds at least `bucket` floats, then summed over the ranks while the
// backward computes the next blocks. The same buckets on every rank, in the same order.
class BucketedAllReduce {
 public:
  BucketedAllReduce(Communicator* comm, Backend* backend, float* grads, size_t bucket)
      : comm_(comm), backend_(backend), grads_(grads), bucket_(bucket), thread_([this] { Loop(); }) {}
  ~BucketedAllReduce() {
    if (thread_.joinable()) (void)Finish();
  }
  void Ready(size_t begin, size_t end) {
    if (begin >= end) return;
    const bool empty = pending_begin_ == pending_end_;
    if (!empty && end != pending_begin_) Submit();  // not adjacent (never expected): its own bucket
    if (pending_begin_ == pending_end_) pending_end_ = end;
    pending_begin_ = begin;
    if (pending_end_ - pending_begin_ >= bucket_) Submit();
  }
  // The rest, then waits for every bucket; the first failure.
  Status Finish() {
    Submit();
    {
      std::lock_guard<std::mutex> lock(mu_);
      done_ = true;
    }
    cv_.notify_all();
    thread_.join();
    return error_;
  }
  double busy_seconds() const { return busy_; }

 private:
  void Submit() {
    if (pending_begin_ == pending_end_) return;
    // The bucket's gradients are queued on the device up to here: its all-reduce waits for
    // this point of the backward (an event), not for the blocks queued after it.
    std::shared_ptr<void> ready = comm_->MarkReady();
    {
      std::lock_guard<std::mutex> lock(mu_);
      queue_.push_back({{pending_begin_, pending_end_}, std::move(ready)});
    }
    cv_.notify_all();
    pending_begin_ = pending_end_ = 0;
  }
  void Loop() {
    // The collectives run on this thread: it must use the rank's device (a CUDA thread
    // starts on device 0, which on rank r > 0 is another rank's GPU).
    if (Status bound = backend_->BindThread(); !bound.ok()) error_ = bound;
    while (true) {
      Bucket bucket;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return !queue_.empty() || done_; });
        if (queue_.empty()) return;
        bucket = std::move(queue_.front());
        queue_.pop_front();
      }
      if (!error_.ok()) continue;  // the communicator is unusable after a failure
      const auto start = std::chrono::steady_clock::now();
      const auto [begin, end] = bucket.range;
      error_ = comm_->AllReduceSumAfter(bucket.ready, grads_ + begin, end - begin);
      busy_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    }
  }

  Communicator* const comm_;
  Backend* const backend_;
  float* const grads_;
  const size_t bucket_;
  size_t pending_begin_ = 0, pending_end_ = 0;  // the caller's thread: the bucket being filled
  std::mutex mu_;
  std::condition_variable cv_;
  struct Bucket {
    std::pair<size_t, size_t> range;
    std::shared_ptr<void> ready;  // Communicator::MarkReady at the bucket's submission
  };
  std::deque<Bucket> queue_;  // guarded by mu_
  bool done_ = false;                            // guarded by mu_
  Status error_;                                 // the thread's; read after join
  double busy_ = 0;                              // the thread's; read after join
  std::thread thread_;
};

}  // namespace

StatusOr<std::unique_ptr<Trainer>> Trainer::Create(const TrainerOptions& options, const DataSplits* data,
                                                   Backend* backend) {
  RETURN_IF_ERROR(options.optimizer.Validate());
  if (options.micro_batch <= 0) return InvalidArgumentError("train.micro_batch must be positive");
  if (options.grad_accum <= 0) return InvalidArgumentError("train.grad_accum must be positive");
  const int W = options.comm != nullptr ? options.comm->world_size() : 1;
  if (options.micro_batch % W != 0) {
    return InvalidArgumentError("train.micro_batch (" + std::to_string(options.micro_batch) +
                                ") must be a multiple of the run's ranks (" + std::to_string(W) +
                                "): each rank trains an equal share of every micro-batch");
  }
  const int T = options.model.context;
  if (data->train.size() < static_cast<size_t>(T) + 1) {
    return InvalidArgumentError("the training split has " + std::to_string(data->train.size()) +
                                " tokens, fewer than model.context + 1 = " + std::to_string(T + 1));
  }
  if (data->max_token >= options.model.vocab) {
    return InvalidArgumentError("the data holds token " + std::to_string(data->max_token) +
                                ", outside model.vocab = " + std::to_string(options.model.vocab));
  }
  std::unique_ptr<Trainer> t(new Trainer(options, data));
  ASSIGN_OR_RETURN(t->model_, Model::Create(options.model, backend));
  // The activations of one micro-batch, allocated now: a model too big for this device
  // is an error here, naming the bytes, not a failure in the middle of a step.
  RETURN_IF_ERROR(t->model_->PrepareActivations(options.micro_batch / W, T));
  t->state_.seed = options.seed;
  t->scalars_ = backend->AllocScalars(2);
  if (t->scalars_ == nullptr) return InternalError("cannot allocate the step's scalars on backend " + std::string(backend->Name()));
  t->inputs_.resize(static_cast<size_t>(options.micro_batch / W) * T);
  t->targets_.resize(t->inputs_.size());
  return t;
}

Trainer::~Trainer() {
  if (scalars_ != nullptr && model_) model_->backend()->Free(scalars_);
}

uint64_t Trainer::data_seed() const { return Mix64(options_.seed ^ 0xDA7A5EEDull); }

void Trainer::Initialize() {
  model_->InitWeights(options_.seed);
  state_.step = 0;
  state_.data_counter = 0;
}

Status Trainer::Resume(const std::string& path) {
  ASSIGN_OR_RETURN(TrainingState s, LoadCheckpoint(path, *model_));
  if (s.seed != options_.seed) {
    return FailedPreconditionError("checkpoint " + path + " belongs to seed " + std::to_string(s.seed) +
                                   ", not " + std::to_string(options_.seed));
  }
  state_ = s;
  return OkStatus();
}

Status Trainer::SaveCheckpoint(const std::string& path) const { return sinkscope::SaveCheckpoint(path, *model_, state_); }

int Trainer::world_size() const { return options_.comm != nullptr ? options_.comm->world_size() : 1; }
int Trainer::rank() const { return options_.comm != nullptr ? options_.comm->rank() : 0; }

StepStats Trainer::Step(PassObserver* observer) {
  const auto start = std::chrono::steady_clock::now();
  const int B = options_.micro_batch, T = options_.model.context, A = options_.grad_accum;
  const float grad_scale = 1.0f / (static_cast<float>(A) * B * T);  // L = mean over the global batch
  // A data-parallel rank trains rows [rank·B/W, (rank+1)·B/W) of every micro-batch of the
  // global batch; the gradients and the loss are then summed over the ranks.
  const int W = world_size(), rows = B / W, first = rank() * rows;
  Backend& be = *model_->backend();
  model_->ZeroGrad();
  be.ZeroScalars(scalars_, 2);
  const bool overlap = W > 1 && options_.allreduce_bucket_floats > 0;
  std::optional<BucketedAllReduce> buckets;
  Model::GradientsReady ready;
  if (overlap) {
    buckets.emplace(options_.comm, &be, model_->grads(), options_.allreduce_bucket_floats);
    ready = [&](size_t begin, size_t end) { buckets->Ready(begin, end); };
  }
  for (int m = 0; m < A; ++m) {
    data_->train.SampleRows(data_seed(), state_.data_counter + m, B, first, rows, T, inputs_.data(), targets_.data());
    // Only the last micro-batch's backward makes gradients final.
    model_->ForwardBackwardInto(inputs_.data(), targets_.data(), rows, T, grad_scale, scalars_, observer,
                                overlap && m == A - 1 ? &ready : nullptr);
  }
  Status collective;
  double comm_seconds = 0, comm_busy = 0;
  if (W > 1) {
    const auto comm_start = std::chrono::steady_clock::now();
    if (overlap) {
      be.Synchronize();  // what the ranges were queued behind (the CPU has nothing queued)
      collective = buckets->Finish();
      comm_busy = buckets->busy_seconds();
    } else {
      collective = options_.comm->AllReduceSum(model_->grads(), model_->slab_floats());
    }
    if (collective.ok()) collective = options_.comm->AllReduceSum(scalars_, 1);
    comm_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - comm_start).count();
    if (!overlap) comm_busy = comm_seconds;
    if (!collective.ok()) {
      StepStats s;
      s.finite = false;
      s.error = collective;
      s.step = state_.step;
      return s;
    }
  }
  StepStats s;
  // The update is queued; it is skipped on the device if the loss or gradient is not
  // finite. One read per step: the loss and the squared gradient norm.
  s.lr = QueueAdamWStep(*model_, options_.optimizer, state_.step, scalars_);
  double host[2];
  be.ReadScalars(host, scalars_, 2);
  s.loss = host[0] / (static_cast<double>(A) * B * T);
  s.grad_norm = std::sqrt(host[1]);
  s.finite = std::isfinite(s.loss) && std::isfinite(s.grad_norm);
  if (Status error = be.TakeError(); !error.ok()) {
    s.finite = false;
    s.error = error;
    s.device_error = true;
  }
  if (s.finite) {
    state_.data_counter += A;
    ++state_.step;
  }
  s.step = state_.step;
  s.comm_seconds = comm_seconds;
  s.comm_busy_seconds = comm_busy;
  s.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  s.tokens_per_second = tokens_per_step() / std::max(s.seconds, 1e-9);
  if (options_.peak_flops > 0) {
    const double achieved = options_.model.TrainFlopsPerToken(T) * s.tokens_per_second;
    mfu_reference_ = std::max({mfu_reference_, options_.peak_flops, achieved});
    s.mfu_reference_flops = mfu_reference_;
    s.mfu = achieved / mfu_reference_;
  }
  return s;
}

StepStats Trainer::ProbedStep(const ProbeSettings& settings, ProbeBatchKind kind, ProbeReport* report) {
  const int T = options_.model.context;
  if (kind == ProbeBatchKind::kStepBatch) {
    ProbeCollector collector(*model_, settings, T);
    StepStats s = Step(&collector);
    if (world_size() > 1 && s.error.ok()) {
      // Each rank saw its rows of the global batch: the report is of all of them.
      if (Status st = collector.ReduceAcross(*options_.comm, options_.micro_batch / world_size()); !st.ok()) {
        s.error = st;
        s.finite = false;
        return s;
      }
    }
    *report = collector.Finish(state_.step + (s.finite ? 0 : 1), s.loss);
    return s;
  }
  const int B = options_.micro_batch;
  std::vector<int32_t> inputs(static_cast<size_t>(B) * T), targets(inputs.size());
  const TokenStream& source = data_->val.size() > static_cast<size_t>(T) ? data_->val : data_->train;
  source.Sample(0x9B0BEull, 0, B, T, inputs.data(), targets.data());  // the same batch every probe
  // Every rank holds the same weights: rank 0 alone measures the held-out batch.
  if (rank() == 0) {
    auto r = RunDiagnosticPass(*model_, settings, inputs.data(), targets.data(), B, T, state_.step + 1);
    if (r.ok()) *report = std::move(*r);
  }
  return Step();
}

double MeasureGemmPeak(Backend& backend) {
  const int n = 1024;
  float* a = backend.Alloc(static_cast<size_t>(n) * n);
  float* b = backend.Alloc(static_cast<size_t>(n) * n);
  float* c = backend.Alloc(static_cast<size_t>(n) * n);
  backend.Fill(a, 0.5f, static_cast<size_t>(n) * n);
  backend.Fill(b, 0.25f, static_cast<size_t>(n) * n);
  backend.Gemm(false, true, n, n, n, 1.0f, a, b, 0.0f, c);  // warm-up
  // The best of several repeats over at least half a second: a repeat that another
  // process slowed down does not set the reference.
  double best = 0;
  const auto begin = std::chrono::steady_clock::now();
  for (int rep = 0; rep < 40 && (rep < 5 || std::chrono::steady_clock::now() - begin < std::chrono::milliseconds(500));
       ++rep) {
    const auto start = std::chrono::steady_clock::now();
    backend.Gemm(false, true, n, n, n, 1.0f, a, b, 0.0f, c);
    float sink;
    backend.ToHost(&sink, c, sizeof(float));  // waits for asynchronous backends
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    best = std::max(best, 2.0 * n * n * n / s);
  }
  backend.Free(a);
  backend.Free(b);
  backend.Free(c);
  return best;
}

double Trainer::Evaluate() {
  const int B = options_.micro_batch, T = options_.model.context;
  if (data_->val.size() < static_cast<size_t>(T) + 1) return NAN;
  // Each rank evaluates its rows of every batch; the sums are added over the ranks.
  const int W = world_size(), rows = B / W, first = rank() * rows;
  std::vector<int32_t> inputs(static_cast<size_t>(rows) * T), targets(inputs.size());
  Backend& be = *model_->backend();
  be.ZeroScalars(scalars_, 1);
  for (int i = 0; i < options_.eval_batches; ++i) {
    // Fixed draws (a seed of their own) so every evaluation sees the same batches.
    data_->val.SampleRows(0xE7A1ull, static_cast<uint64_t>(i), B, first, rows, T, inputs.data(), targets.data());
    model_->EvaluateInto(inputs.data(), targets.data(), rows, T, scalars_);
  }
  if (W > 1 && !options_.comm->AllReduceSum(scalars_, 1).ok()) return NAN;
  double sum = 0;
  be.ReadScalars(&sum, scalars_, 1);
  return sum / (static_cast<double>(options_.eval_batches) * B * T);
}

}  // namespace sinkscope
