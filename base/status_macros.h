// splitq base: the status macros every folder uses, and nothing else (the one header below
// kernels/ in the dependency order: base -> kernels -> quant -> trainer -> ...).
//
// Abseil 20220623 (Debian 12's) has no RETURN_IF_ERROR / ASSIGN_OR_RETURN, so the project
// defines them once, here:
//   SPLITQ_RETURN_IF_ERROR(expr);                 // expr: absl::Status; returns it if not OK
//   SPLITQ_ASSIGN_OR_RETURN(auto x, expr);        // expr: absl::StatusOr<T>; x = its value, or
//                                                 // returns its status (from a function that
//                                                 // returns absl::Status or absl::StatusOr)
#pragma once

#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define SPLITQ_RETURN_IF_ERROR(expr)                 \
  do {                                               \
    const ::absl::Status splitq_status_ = (expr);    \
    if (!splitq_status_.ok()) return splitq_status_; \
  } while (false)

#define SPLITQ_CONCAT_INNER_(a, b) a##b
#define SPLITQ_CONCAT_(a, b) SPLITQ_CONCAT_INNER_(a, b)
#define SPLITQ_ASSIGN_OR_RETURN(lhs, expr) \
  SPLITQ_ASSIGN_OR_RETURN_IMPL_(SPLITQ_CONCAT_(splitq_statusor_, __LINE__), lhs, expr)
#define SPLITQ_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                                  \
  if (!tmp.ok()) return tmp.status();                 \
  lhs = std::move(tmp).value()
