#include "trainer/step.h"

#include <algorithm>
#include <cmath>

#include "base/status_macros.h"
#include "trainer/client_part.h"

namespace splitq::trainer {

double LearningRateAt(const RunConfig& c, int64_t step, double base) {
  step = std::max<int64_t>(step, 0);  // a negative step would give a negative rate
  if (step < c.warmup_steps) return base * static_cast<double>(step + 1) / c.warmup_steps;
  const double span = std::max<int64_t>(1, c.steps - c.warmup_steps);
  const double t = static_cast<double>(step - c.warmup_steps) / span;
  return base * 0.5 * (1.0 + std::cos(M_PI * std::min(1.0, t)));
}

absl::StatusOr<StepStats> ClientRunner::Step() {
  for (;;) {
    SPLITQ_ASSIGN_OR_RETURN(UpFrame up, part_.Forward());
    absl::StatusOr<DownFrame> down = link_.Train(up);
    if (down.ok() && down->activation) {  // U-shaped: the head, then the rest of the step
      SPLITQ_ASSIGN_OR_RETURN(HeadGradient head, part_.Head(*down));
      down = link_.TrainHead(head);
    }
    if (down.ok()) return part_.Backward(*down);
    SPLITQ_RETURN_IF_ERROR(link_.Recover(down.status()));
    part_.NewSession();
  }
}

absl::StatusOr<EvalStats> ClientRunner::Evaluate() {
  double loss_sum = 0, correct = 0, count = 0;
  for (int64_t i = 0; i < part_.validation_batches(); ++i) {
    SPLITQ_ASSIGN_OR_RETURN(UpFrame up, part_.EvalForward(i));
    absl::StatusOr<EvalPiece> piece = link_.Evaluate(up);
    if (!piece.ok()) {
      SPLITQ_RETURN_IF_ERROR(link_.Recover(piece.status()));
      part_.NewSession();
      --i;  // this batch again, on the new session
      continue;
    }
    if (config().u_shaped) {
      SPLITQ_ASSIGN_OR_RETURN(*piece, part_.EvalHead(i, *piece));
    }
    loss_sum += piece->loss_sum;
    correct += static_cast<double>(piece->correct);
    count += static_cast<double>(piece->count);
  }
  link_.EndEvaluation();
  EvalStats out;
  if (count == 0) return absl::InternalError("validation: no targets");
  out.loss = loss_sum / count;
  if (config().task == Task::kFashionMnist) {
    out.accuracy = correct / count;
  } else {
    out.bits_per_byte = out.loss / std::log(2.0);
  }
  return out;
}

absl::Status ClientRunner::SaveCheckpoint(const std::string& path,
                                          const std::vector<double>& driver_state) const {
  return part_.SaveCheckpoint(path, driver_state);
}
absl::Status ClientRunner::LoadCheckpoint(const std::string& path, std::vector<double>* driver) {
  return part_.LoadCheckpoint(path, driver);
}
int64_t ClientRunner::step() const { return part_.step(); }
const RunConfig& ClientRunner::config() const { return part_.config(); }
WireTotals ClientRunner::wire() const { return part_.wire(); }
std::string ClientRunner::device() const { return part_.device(); }

}  // namespace splitq::trainer
