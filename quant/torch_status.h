// splitq quant: the one place torch's exceptions become statuses. Code on libtorch (quant/,
// trainer/) runs torch calls inside TorchCall instead of writing its own try/catch.
#pragma once

#include <c10/util/Exception.h>

#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace splitq::quant {

// Runs `body` (returning absl::Status or absl::StatusOr<T>) and turns a c10::Error it throws
// into `code` with "`what`: <torch's message>" (just the message when `what` is empty).
template <typename F>
auto TorchCall(const std::string& what, F&& body,
               absl::StatusCode code = absl::StatusCode::kInternal) -> decltype(body()) {
  try {
    return body();
  } catch (const c10::Error& e) {
    return absl::Status(code, what.empty() ? std::string(e.what_without_backtrace())
                                           : absl::StrCat(what, ": ", e.what_without_backtrace()));
  }
}

}  // namespace splitq::quant
