#include "trainer/config.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <functional>
#include <set>
#include <sstream>
#include <type_traits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "base/status_macros.h"
#include "trainer/config_keys.h"

namespace splitq::trainer {
namespace {

using internal::Key;
using internal::Keys;
using internal::Kind;
using internal::kNoLimit;
using internal::Number;
using internal::RangeText;
using internal::TypeText;
using internal::Value;

bool IsKey(const std::string& path) {
  return std::any_of(Keys().begin(), Keys().end(), [&](const Key& k) { return path == k.path; });
}
std::vector<std::string> ChildrenOf(const std::string& prefix) {
  std::set<std::string> children;
  const std::string dotted = prefix.empty() ? "" : prefix + ".";
  for (const Key& k : Keys()) {
    const std::string path = k.path;
    if (path.rfind(dotted, 0) != 0) continue;
    const std::string rest = path.substr(dotted.size());
    children.insert(rest.substr(0, rest.find('.')));
  }
  return {children.begin(), children.end()};
}

std::string Show(const YAML::Node& node) {
  if (node.IsScalar()) return node.Scalar();
  std::stringstream out;
  out << YAML::Dump(node);
  std::string s = out.str();
  std::replace(s.begin(), s.end(), '\n', ' ');
  return s;
}

// Levenshtein distance, ignoring case.
size_t EditDistance(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diagonal = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t above = row[j];
      const bool same = std::tolower(static_cast<unsigned char>(a[i - 1])) ==
                        std::tolower(static_cast<unsigned char>(b[j - 1]));
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (same ? 0 : 1)});
      diagonal = above;
    }
  }
  return row[b.size()];
}

std::string LastPart(const std::string& path) { return path.substr(path.rfind('.') + 1); }
std::string ParentOf(const std::string& path) {
  const size_t dot = path.rfind('.');
  return dot == std::string::npos ? "" : path.substr(0, dot);
}

// The known key or map nearest to an unknown `path`: a typo ("stepz" -> "steps"), a key under
// the wrong map ("lr" -> "optim.lr"), or a shortened name ("optim.warmup" ->
// "optim.warmup_steps"). Empty when nothing is close.
std::string NearestKey(const std::string& path) {
  std::set<std::string> known;
  for (const Key& k : Keys()) {
    std::string p = k.path;
    known.insert(p);
    for (size_t dot = p.rfind('.'); dot != std::string::npos; dot = p.rfind('.')) {
      p.resize(dot);
      known.insert(p);  // the maps above the key
    }
  }
  const std::string leaf = LastPart(path);
  const std::string parent = ParentOf(path);
  std::string best;
  size_t best_distance = std::max<size_t>(2, path.size() / 4) + 1;
  for (const std::string& candidate : known) {
    size_t d = EditDistance(path, candidate);
    const std::string candidate_leaf = LastPart(candidate);
    if (EditDistance(leaf, candidate_leaf) == 0) d = std::min<size_t>(d, 1);  // misplaced
    if (ParentOf(candidate) == parent && leaf.size() >= 3 &&
        (candidate_leaf.rfind(leaf, 0) == 0 || leaf.rfind(candidate_leaf, 0) == 0)) {
      d = std::min<size_t>(d, 2);  // shortened or lengthened
    }
    if (d < best_distance) best_distance = d, best = candidate;
  }
  return best;
}

absl::Status CheckKeys(const YAML::Node& node, const std::string& prefix) {
  if (!node.IsMap()) {
    return absl::InvalidArgumentError(
        absl::StrCat(prefix.empty() ? "config" : prefix, ": expected a map of keys (",
                     absl::StrJoin(ChildrenOf(prefix), ", "), "), got '", Show(node), "'"));
  }
  std::set<std::string> seen;
  for (const auto& entry : node) {
    // YAML gives a repeated key's first value (the rest would be dropped without a word), and
    // a key may be any node ("? [a, b]"): both are refused.
    if (!entry.first.IsScalar()) {
      return absl::InvalidArgumentError(absl::StrCat(prefix.empty() ? "config" : prefix,
                                                     ": a key must be a plain name, got '",
                                                     Show(entry.first), "'"));
    }
    const std::string name = entry.first.as<std::string>();
    const std::string path = prefix.empty() ? name : prefix + "." + name;
    if (!seen.insert(name).second) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": the key appears twice (YAML would take the first and drop the rest)"));
    }
    if (IsKey(path)) continue;
    const std::vector<std::string> children = ChildrenOf(path);
    if (children.empty()) {
      const std::string nearest = NearestKey(path);
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": unknown key (value '", Show(entry.second), "'",
                       nearest.empty() ? ";" : absl::StrCat("; did you mean '", nearest, "'?"),
                       " expected one of: ", absl::StrJoin(ChildrenOf(prefix), ", "), ")"));
    }
    SPLITQ_RETURN_IF_ERROR(CheckKeys(entry.second, path));
  }
  return absl::OkStatus();
}

// Walks `path` without touching the tree: const lookups insert nothing, and reset() rebinds
// the handle (assigning a YAML::Node would overwrite the node it refers to).
YAML::Node Find(const YAML::Node& root, const std::string& path) {
  YAML::Node node;
  node.reset(root);
  for (const std::string& part : std::vector<std::string>(absl::StrSplit(path, '.'))) {
    if (!node.IsMap()) return YAML::Node();
    const YAML::Node& current = node;
    const YAML::Node child = current[part];
    if (!child.IsDefined()) return YAML::Node();
    node.reset(child);
  }
  return node;
}

// Reads, checks and stores one row's key when the document has it (absent: the default stays).
absl::Status ReadKey(const YAML::Node& root, const Key& k, RunConfig* c) {
  const YAML::Node node = Find(root, k.path);
  if (!node.IsDefined() || node.IsNull()) return absl::OkStatus();
  Value v;
  const char* expected = "";
  try {
    switch (k.kind) {
      case Kind::kInt: {
        expected = "an integer";
        // yaml-cpp reads 010 as 8 and 0x10 as 16: only plain decimal is taken.
        const std::string text = node.IsScalar() ? node.Scalar() : std::string();
        const size_t d = !text.empty() && (text[0] == '-' || text[0] == '+') ? 1 : 0;
        if (text.size() > d + 1 && text[d] == '0') {
          return absl::InvalidArgumentError(absl::StrCat(
              k.path, ": '", text, "': write integers in decimal, without leading zeros"));
        }
        v.i = node.as<int64_t>();
        break;
      }
      case Kind::kNumber:
        expected = "a number";
        v.d = node.as<double>();
        break;
      case Kind::kBool:
        expected = "true or false";
        v.b = node.as<bool>();
        break;
      case Kind::kChoice:
        expected = "a word";
        v.s = node.as<std::string>();
        break;
      case Kind::kText:
        expected = "a name or path";
        v.s = node.as<std::string>();
        break;
      case Kind::kNames:
        expected = "a list of names";
        v.names = node.as<std::vector<std::string>>();
        break;
      case Kind::kSchedule:
        v.node = node;
        break;
    }
  } catch (const YAML::Exception&) {
    return absl::InvalidArgumentError(
        absl::StrCat(k.path, ": expected ", expected, ", got '", Show(node), "'"));
  }
  const auto outside = [&](const std::string& value) {
    return absl::InvalidArgumentError(
        absl::StrCat(k.path, ": ", value, " is outside ", RangeText(k)));
  };
  if (k.kind == Kind::kInt && !(k.zero_ok && v.i == 0) &&
      (static_cast<double>(v.i) < k.lo || static_cast<double>(v.i) > k.hi)) {
    return outside(absl::StrCat(v.i));
  }
  if (k.kind == Kind::kNumber &&
      (!std::isfinite(v.d) || v.d < k.lo || (k.lo_open && v.d == k.lo) || v.d > k.hi)) {
    return outside(Number(v.d));
  }
  const auto allowed = [&](const std::string& word) {
    return std::find(k.choices.begin(), k.choices.end(), word) != k.choices.end();
  };
  if (k.kind == Kind::kChoice && !allowed(v.s)) {
    return absl::InvalidArgumentError(
        absl::StrCat(k.path, ": '", v.s, "' is not one of ", absl::StrJoin(k.choices, ", ")));
  }
  for (const std::string& name : v.names) {
    if (!allowed(name)) {
      return absl::InvalidArgumentError(
          absl::StrCat(k.path, ": '", name, "' is not one of ", absl::StrJoin(k.choices, ", ")));
    }
  }
  return k.set(*c, v);
}

// What one key's value means for another's (after every row is read).
absl::Status CheckAcrossKeys(const RunConfig& c) {
  for (const auto& [prefix, bits] : {std::pair{"quant.activations", c.activations.bits},
                                     std::pair{"quant.gradients", c.gradients.bits}}) {
    if (bits.max < bits.min) {
      return absl::InvalidArgumentError(absl::StrCat(prefix, ".bits.max: ", bits.max, " is below ",
                                                     prefix, ".bits.min ", bits.min));
    }
  }
  if (c.width % c.heads != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("model.heads: ", c.heads, " does not divide model.width ", c.width));
  }
  const int max_split = c.task == Task::kFashionMnist ? (c.u_shaped ? 2 : 3) : c.layers - 1;
  if (c.split_after < 1 || c.split_after > max_split) {
    return absl::InvalidArgumentError(
        absl::StrCat("model.split_after: ", c.split_after, " is outside the model (1..", max_split,
                     " for ", c.task == Task::kFashionMnist ? "the CNN" : "this transformer",
                     c.u_shaped ? ", U-shaped" : "", ")"));
  }
  if (c.activations.rotation != 0) {
    if ((c.activations.rotation & (c.activations.rotation - 1)) != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("quant.activations.rotation: ", c.activations.rotation,
                       " is not a power of two (0: off)"));
    }
    if (c.activations.mode == WireMode::kFloat32) {
      return absl::InvalidArgumentError(
          "quant.activations.rotation: the activations cross as fp32 (quant.activations.mode): "
          "a rotation would only cost time; set it to 0 or quantize");
    }
  }
  if (c.activations.coded && c.activations.mode == WireMode::kFloat32) {
    return absl::InvalidArgumentError(
        "quant.activations.coding: the activations cross as fp32 (quant.activations.mode): "
        "there are no codes to entropy-code; set it to none or quantize");
  }
  if (c.activations.budget_in_bytes) {
    if (c.activations.mode != WireMode::kAmaq) {
      return absl::InvalidArgumentError(
          "quant.activations.budget: bytes prices learned bits, which only quant.activations.mode "
          "amaq has; set it to bits or use amaq");
    }
    if (!c.activations.coded) {
      return absl::InvalidArgumentError(
          "quant.activations.budget: bytes counts coded bytes, but quant.activations.coding is "
          "none (then bytes are the nominal bits / 8): set coding to rans or the budget to bits");
    }
  }
  if (c.gradients.coded && c.gradients.mode == WireMode::kFloat32) {
    return absl::InvalidArgumentError(
        "quant.gradients.coding: the gradients cross as fp32 (quant.gradients.mode): there are "
        "no codes to entropy-code; set it to none or quantize");
  }
  if (c.lora_rank > 0 && c.task != Task::kLanguageModel) {
    return absl::InvalidArgumentError("lora.rank: LoRA applies to task lm only");
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<RunConfig> ParseRunConfig(const YAML::Node& root) {
  if (root.IsNull() || !root.IsDefined()) return RunConfig{};
  SPLITQ_RETURN_IF_ERROR(CheckKeys(root, ""));
  RunConfig c;
  // A schedule's default is its bits.max; the rows read bits before targets.
  bool activation_target = false, gradient_target = false;
  for (const Key& k : Keys()) {
    SPLITQ_RETURN_IF_ERROR(ReadKey(root, k, &c));
    if (k.kind == Kind::kSchedule) {
      const bool given = Find(root, k.path).IsDefined() && !Find(root, k.path).IsNull();
      (std::string(k.path) == "quant.activations.target" ? activation_target : gradient_target) =
          given;
    }
  }
  if (!activation_target)
    c.activations.target = *quant::BitSchedule::Constant(c.activations.bits.max);
  if (!gradient_target) c.gradients.target = *quant::BitSchedule::Constant(c.gradients.bits.max);
  SPLITQ_RETURN_IF_ERROR(CheckAcrossKeys(c));
  return c;
}

absl::Status ApplyOverride(YAML::Node& root, const std::string& assignment) {
  const size_t eq = assignment.find('=');
  if (eq == std::string::npos || eq == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--set '", assignment, "': expected key.path=value"));
  }
  const std::string path = assignment.substr(0, eq);
  for (const absl::string_view part : absl::StrSplit(path, '.')) {
    if (part.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--set '", assignment, "': a key path of names joined by single dots"));
    }
  }
  YAML::Node value;
  try {
    value = YAML::Load(assignment.substr(eq + 1));
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("--set ", path, ": the value is not YAML: ", e.what()));
  }
  if (!value.IsDefined() || value.IsNull()) {
    // An empty or null value would quietly give the key its default again.
    return absl::InvalidArgumentError(absl::StrCat("--set ", path, ": no value (", path,
                                                   "=VALUE; leave the --set out for the default)"));
  }
  if (!root.IsDefined() || root.IsNull()) root = YAML::Node(YAML::NodeType::Map);
  const std::vector<std::string> parts = absl::StrSplit(path, '.');
  std::vector<YAML::Node> chain{root};
  for (size_t i = 0; i + 1 < parts.size(); ++i) {
    YAML::Node child = chain.back()[parts[i]];
    if (!child.IsDefined() || child.IsNull()) child = YAML::Node(YAML::NodeType::Map);
    if (!child.IsMap()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--set ", path, ": '", parts[i], "' is not a map"));
    }
    chain.back()[parts[i]] = child;
    chain.push_back(chain.back()[parts[i]]);
  }
  chain.back()[parts.back()] = value;
  return absl::OkStatus();
}

namespace {

// The --set assignment whose key is, contains or lies inside the key an error message starts
// with ("quant.activations.target[1].step: ..."); empty when the error is the file's.
std::string OverrideBehind(const std::string& message, const std::vector<std::string>& overrides) {
  std::string key = message.substr(0, message.find(':'));
  key = key.substr(0, key.find('['));
  auto within = [](const std::string& outer, const std::string& inner) {
    return inner == outer || inner.rfind(outer + ".", 0) == 0;
  };
  // The last --set of a key wins, so it is the one to blame.
  for (auto it = overrides.rbegin(); it != overrides.rend(); ++it) {
    std::string path = it->substr(0, it->find('='));
    path = path.substr(0, path.find('['));  // a --set of "target[0].bits" is one of "target"
    if (!key.empty() && (within(path, key) || within(key, path))) return *it;
  }
  return "";
}

}  // namespace

absl::StatusOr<RunConfig> LoadRunConfig(const std::string& path,
                                        const std::vector<std::string>& overrides) {
  YAML::Node root;
  std::error_code kind_error;
  const auto kind = std::filesystem::status(path, kind_error).type();
  if (kind == std::filesystem::file_type::not_found) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": no such file"));
  }
  if (kind == std::filesystem::file_type::directory) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": a folder, not a config file"));
  }
  errno = 0;
  try {
    root = YAML::LoadFile(path);
  } catch (const YAML::BadFile&) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": cannot read the config file",
                     errno == 0 ? std::string() : absl::StrCat(" (", std::strerror(errno), ")")));
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not valid YAML: ", e.what()));
  }
  for (const std::string& o : overrides) SPLITQ_RETURN_IF_ERROR(ApplyOverride(root, o));
  auto config = ParseRunConfig(root);
  if (!config.ok()) {
    const std::string message(config.status().message());
    const std::string assignment = OverrideBehind(message, overrides);
    return absl::Status(config.status().code(),
                        assignment.empty() ? absl::StrCat(path, ": ", message)
                                           : absl::StrCat("--set ", assignment, ": ", message));
  }
  return config;
}

std::string ConfigReference() {
  // Cells may hold "a | b" choices: escape the bar so the Markdown table keeps its columns.
  auto cell = [](const char* text) { return absl::StrReplaceAll(text, {{"|", "\\|"}}); };
  std::string out = "| key | type | default | meaning |\n|---|---|---|---|\n";
  const RunConfig defaults;
  for (const Key& k : Keys()) {
    absl::StrAppend(&out, "| `", k.path, "` | ", cell(TypeText(k).c_str()), " | `", k.get(defaults),
                    "` | ", cell(k.doc), " |\n");
  }
  return out;
}

}  // namespace splitq::trainer
