// Where a fused decode step's time goes (decode_step.cpp): wall time per part, summed over steps while profiling is
// on (`decode_step_profile`, benchmarks/step_time.py). Off by default; then a timer costs one relaxed atomic load.
#pragma once

#include <array>
#include <atomic>
#include <chrono>

namespace llmengine_cpu {

enum StepPart { NORM, PRODUCT, ROTARY, STORE_KV, ATTENTION, ACTIVATION, HEAD, STEP, NUM_PARTS };  // HEAD: step_logits'

struct StepProfile {
  std::atomic<bool> enabled{false};
  std::array<double, NUM_PARTS> seconds{};
  int64_t steps = 0;
};

StepProfile& step_profile();

// Adds the wall time of its scope to one part, when profiling is on (NUM_PARTS: to none).
class PartTimer {
 public:
  explicit PartTimer(StepPart part)
      : part_(part), on_(part != NUM_PARTS && step_profile().enabled.load(std::memory_order_relaxed)) {
    if (on_) start_ = std::chrono::steady_clock::now();
  }
  ~PartTimer() {
    if (on_) step_profile().seconds[part_] +=
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  }

 private:
  StepPart part_;
  bool on_;
  std::chrono::steady_clock::time_point start_;
};

}  // namespace llmengine_cpu
