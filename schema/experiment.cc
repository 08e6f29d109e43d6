#include "schema/experiment.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <yaml-cpp/depthguard.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include "data/data.h"

namespace sinkscope {
namespace {

namespace pb = google::protobuf;

std::string Where(const std::string& source, const YAML::Node& node) {
  const YAML::Mark mark = node.Mark();
  if (mark.line < 0) return source;
  return source + ":" + std::to_string(mark.line + 1);
}

Status FieldError(const std::string& source, const YAML::Node& node, const std::string& path,
                  const std::string& why) {
  return InvalidArgumentError(Where(source, node) + ": " + path + ": " + why);
}

std::string KnownFields(const pb::Descriptor* d) {
  std::string s;
  for (int i = 0; i < d->field_count(); ++i) s += (i ? ", " : "") + d->field(i)->name();
  return s;
}

// Well-formed UTF-8 (no overlong forms, surrogates or code points past U+10FFFF): proto3
// string fields must be, or the message does not serialise and parse back.
bool IsUtf8(const std::string& s) {
  size_t i = 0;
  while (i < s.size()) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    int n = 0;
    uint32_t cp = 0;
    if (c < 0x80) {
      ++i;
      continue;
    } else if ((c & 0xE0) == 0xC0) {
      n = 1, cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      n = 2, cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      n = 3, cp = c & 0x07;
    } else {
      return false;
    }
    if (i + n >= s.size()) return false;  // truncated
    for (int k = 1; k <= n; ++k) {
      const unsigned char cc = static_cast<unsigned char>(s[i + k]);
      if ((cc & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (cc & 0x3F);
    }
    static constexpr uint32_t kMin[] = {0, 0x80, 0x800, 0x10000};
    if (cp < kMin[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += n + 1;
  }
  return true;
}

std::string Lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}
std::string Upper(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::toupper(c); });
  return s;
}

// An arm name that combines two defined arms the engine does not define together
// ("gated_value_vscale", "sigmoid+vscale_backward_only"): the reason, else "".
std::string UndefinedArmCombination(const std::string& name) {
  for (const char* value_path : {"vscale_backward_only", "vscale"}) {
    for (const char* sep : {"_", "+"}) {
      const std::string suffix = std::string(sep) + value_path, prefix = std::string(value_path) + sep;
      std::string other;
      if (name.size() > suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0) {
        other = name.substr(0, name.size() - suffix.size());
      } else if (name.size() > prefix.size() && name.compare(0, prefix.size(), prefix) == 0) {
        other = name.substr(prefix.size());
      } else {
        continue;
      }
      const pb::EnumValueDescriptor* arm = v1::Arm_descriptor()->FindValueByName(Upper(other));
      if (arm == nullptr || arm->number() == 0) continue;
      if (std::string(value_path) == "vscale_backward_only") {
        return "the combination of " + other + " with vscale_backward_only is not defined: the control arm is the "
               "softmax baseline's (docs/design/ARMS.md, \"Combinations\")";
      }
      if (other == "gated_value") {
        return "the combination of gated_value with vscale is not defined: both rewrite the value that enters "
               "attention and no paper fixes their order (docs/design/ARMS.md, \"Combinations\")";
      }
      return "\"" + name + "\" is not an arm; the combination is spelt " + other + "_vscale";
    }
  }
  return "";
}

// One scalar (or enum) value of `field`, set or appended on `msg`.
Status SetScalar(const YAML::Node& node, pb::Message* msg, const pb::FieldDescriptor* field,
                 const std::string& path, const std::string& source) {
  if (!node.IsScalar()) return FieldError(source, node, path, "expected a single value");
  const pb::Reflection* r = msg->GetReflection();
  const bool rep = field->is_repeated();
  const std::string text = node.Scalar();
  try {
    switch (field->cpp_type()) {
      case pb::FieldDescriptor::CPPTYPE_INT32: {
        const int32_t v = node.as<int32_t>();
        rep ? r->AddInt32(msg, field, v) : r->SetInt32(msg, field, v);
        break;
      }
      case pb::FieldDescriptor::CPPTYPE_INT64: {
        const int64_t v = node.as<int64_t>();
        rep ? r->AddInt64(msg, field, v) : r->SetInt64(msg, field, v);
        break;
      }
      case pb::FieldDescriptor::CPPTYPE_UINT32: {
        if (!text.empty() && text[0] == '-') throw YAML::BadConversion(node.Mark());
        const uint32_t v = node.as<uint32_t>();
        rep ? r->AddUInt32(msg, field, v) : r->SetUInt32(msg, field, v);
        break;
      }
      case pb::FieldDescriptor::CPPTYPE_UINT64: {
        if (!text.empty() && text[0] == '-') throw YAML::BadConversion(node.Mark());
        const uint64_t v = node.as<uint64_t>();
        rep ? r->AddUInt64(msg, field, v) : r->SetUInt64(msg, field, v);
        break;
      }
      case pb::FieldDescriptor::CPPTYPE_DOUBLE: {
        const double v = node.as<double>();
        rep ? r->AddDouble(msg, field, v) : r->SetDouble(msg, field, v);
        break;
      }
      case pb::FieldDescriptor::CPPTYPE_FLOAT: {
        const float v = node.as<float>();
        rep ? r->AddFloat(msg, field, v) : r->SetFloat(msg, field, v);
        break;
      }
      case pb::FieldDescriptor::CPPTYPE_BOOL: {
        const bool v = node.as<bool>();
        rep ? r->AddBool(msg, field, v) : r->SetBool(msg, field, v);
        break;
      }
      case pb::FieldDescriptor::CPPTYPE_STRING: {
        if (!IsUtf8(text)) return FieldError(source, node, path, "is not valid UTF-8");
        rep ? r->AddString(msg, field, text) : r->SetString(msg, field, text);
        break;
      }
      case pb::FieldDescriptor::CPPTYPE_ENUM: {
        const pb::EnumDescriptor* e = field->enum_type();
        const pb::EnumValueDescriptor* value = nullptr;
        for (int i = 0; i < e->value_count(); ++i) {
          if (Lower(e->value(i)->name()) == Lower(text) && e->value(i)->number() != 0) value = e->value(i);
        }
        if (value == nullptr && e == v1::Arm_descriptor()) {
          const std::string undefined = UndefinedArmCombination(Lower(text));
          if (!undefined.empty()) return FieldError(source, node, path, undefined);
        }
        if (value == nullptr) {
          std::string known;
          for (int i = 1; i < e->value_count(); ++i) known += (i > 1 ? ", " : "") + Lower(e->value(i)->name());
          return FieldError(source, node, path, "unknown value \"" + text + "\" (expected one of: " + known + ")");
        }
        rep ? r->AddEnum(msg, field, value) : r->SetEnum(msg, field, value);
        break;
      }
      default:
        return FieldError(source, node, path, "unsupported field type");
    }
  } catch (const YAML::Exception&) {
    const char* want = field->cpp_type() == pb::FieldDescriptor::CPPTYPE_BOOL     ? "true or false"
                       : field->cpp_type() == pb::FieldDescriptor::CPPTYPE_DOUBLE ? "a number"
                       : field->cpp_type() == pb::FieldDescriptor::CPPTYPE_UINT64 ||
                               field->cpp_type() == pb::FieldDescriptor::CPPTYPE_UINT32
                           ? "a non-negative integer"
                           : "an integer";
    return FieldError(source, node, path, std::string("expected ") + want + ", got \"" + text + "\"");
  }
  return OkStatus();
}

Status YamlToSweep(const YAML::Node& node, v1::Experiment* e, const std::string& source);

Status YamlToMessage(const YAML::Node& node, pb::Message* msg, const std::string& prefix, const std::string& source) {
  if (!node.IsMap()) {
    return FieldError(source, node, prefix.empty() ? "(top level)" : prefix, "expected a mapping of fields");
  }
  const pb::Descriptor* d = msg->GetDescriptor();
  const pb::Reflection* r = msg->GetReflection();
  std::map<const pb::FieldDescriptor*, std::pair<std::string, int>> seen;  // field → (key, line) given
  for (auto it = node.begin(); it != node.end(); ++it) {
    if (!it->first.IsScalar()) {  // `{a: 1,, }` or a complex key
      return FieldError(source, it->first, prefix.empty() ? "(top level)" : prefix, "expected a field name");
    }
    const std::string key = it->first.Scalar();
    const std::string path = prefix.empty() ? key : prefix + "." + key;
    const pb::FieldDescriptor* field = d->FindFieldByName(key);
    if (field == nullptr) field = d->FindFieldByCamelcaseName(key);
    if (field == nullptr) {
      return FieldError(source, it->first, path, "unknown field (known: " + KnownFields(d) + ")");
    }
    // YAML wants unique keys but yaml-cpp keeps both: a repeat would silently override a
    // value, merge two sections or append to a list.
    if (auto [first, fresh] = seen.try_emplace(field, key, it->first.Mark().line + 1); !fresh) {
      return FieldError(source, it->first, path,
                        "given twice (first as \"" + first->second.first + "\" on line " +
                            std::to_string(first->second.second) + ")");
    }
    // A copy (a node is a handle): yaml-cpp's iterator returns its pair by value, so a
    // reference to it->second dangles at the end of this statement.
    const YAML::Node value = it->second;
    if (value.IsNull()) continue;  // `key:` with nothing: the default
    if (const pb::OneofDescriptor* oneof = field->real_containing_oneof()) {
      const pb::FieldDescriptor* set = r->GetOneofFieldDescriptor(*msg, oneof);
      if (set != nullptr && set != field) {
        return FieldError(source, it->first, path, "conflicts with " + (prefix.empty() ? "" : prefix + ".") +
                                                       set->name() + " (only one of them may be given)");
      }
    }
    if (field->is_repeated() && field->message_type() == v1::SweepAxis::descriptor()) {
      RETURN_IF_ERROR(YamlToSweep(value, static_cast<v1::Experiment*>(msg), source));
      continue;
    }
    if (field->is_repeated()) {
      if (!value.IsSequence()) return FieldError(source, value, path, "expected a list");
      for (size_t i = 0; i < value.size(); ++i) {
        const std::string item = path + "[" + std::to_string(i) + "]";
        if (field->cpp_type() == pb::FieldDescriptor::CPPTYPE_MESSAGE) {
          RETURN_IF_ERROR(YamlToMessage(value[i], r->AddMessage(msg, field), item, source));
        } else {
          RETURN_IF_ERROR(SetScalar(value[i], msg, field, item, source));
        }
      }
    } else if (field->cpp_type() == pb::FieldDescriptor::CPPTYPE_MESSAGE) {
      RETURN_IF_ERROR(YamlToMessage(value, r->MutableMessage(msg, field), path, source));
    } else {
      RETURN_IF_ERROR(SetScalar(value, msg, field, path, source));
    }
  }
  return OkStatus();
}

// ---- sweeps

// The chain of fields a sweep path names, from Experiment down to a single-valued
// scalar of model, train, data or probe; an error (the rule, without the path) if none.
StatusOr<std::vector<const pb::FieldDescriptor*>> SweepFieldChain(const std::string& path) {
  std::vector<const pb::FieldDescriptor*> chain;
  const pb::Descriptor* d = v1::Experiment::descriptor();
  size_t begin = 0;
  while (true) {
    const size_t dot = path.find('.', begin);
    const std::string part = path.substr(begin, dot == std::string::npos ? std::string::npos : dot - begin);
    const pb::FieldDescriptor* f = d == nullptr ? nullptr : d->FindFieldByName(part);
    if (chain.empty() && part != "model" && part != "train" && part != "data" && part != "probe") {
      return InvalidArgumentError("a sweep sets fields of model, train, data or probe, as section.field");
    }
    if (f == nullptr) {
      return InvalidArgumentError("unknown field \"" + part + "\"" +
                                  (d == nullptr ? "" : " (known in " + std::string(d->name()) + ": " + KnownFields(d) + ")"));
    }
    chain.push_back(f);
    if (dot == std::string::npos) break;
    if (f->is_repeated() || f->cpp_type() != pb::FieldDescriptor::CPPTYPE_MESSAGE) {
      return InvalidArgumentError(std::string(f->name()) + " has no fields");
    }
    d = f->message_type();
    begin = dot + 1;
  }
  const pb::FieldDescriptor* last = chain.back();
  if (last->is_repeated()) return InvalidArgumentError("is a list; a sweep sets single-valued fields");
  if (last->cpp_type() == pb::FieldDescriptor::CPPTYPE_MESSAGE) {
    return InvalidArgumentError("is a section; a sweep sets single fields of it (e.g. " + path + "." +
                                std::string(last->message_type()->field(0)->name()) + ")");
  }
  return chain;
}

// Sets the field at the end of `chain` on `e` from `value` (parsed as the file would be).
// A oneof the chain passes through must not hold another member (data.text vs data.shards).
Status SetSweepValue(const std::vector<const pb::FieldDescriptor*>& chain, const YAML::Node& value, v1::Experiment* e,
                     const std::string& path, const std::string& source) {
  pb::Message* msg = e;
  for (size_t i = 0; i + 1 < chain.size(); ++i) {
    const pb::Reflection* r = msg->GetReflection();
    if (const pb::OneofDescriptor* oneof = chain[i]->real_containing_oneof()) {
      const pb::FieldDescriptor* set = r->GetOneofFieldDescriptor(*msg, oneof);
      if (set != nullptr && set != chain[i]) {
        return FieldError(source, value, path,
                          "the experiment's " + std::string(msg->GetDescriptor()->name() == "DataSpec" ? "data" : "section") +
                              " has " + std::string(set->name()) + ", not " + std::string(chain[i]->name()));
      }
    }
    msg = r->MutableMessage(msg, chain[i]);
  }
  return SetScalar(value, msg, chain.back(), path, source);
}

// `sweep:` in a file: a mapping of field paths to lists of values, kept in the file's
// order; each value is checked against its field's type here, so errors carry the line.
Status YamlToSweep(const YAML::Node& node, v1::Experiment* e, const std::string& source) {
  if (!node.IsMap()) {
    return FieldError(source, node, "sweep", "expected a mapping of field paths to lists of values, e.g. {train.lr: [1e-3, 3e-3]}");
  }
  for (auto it = node.begin(); it != node.end(); ++it) {
    if (!it->first.IsScalar()) return FieldError(source, it->first, "sweep", "expected a field path");
    const std::string path = it->first.Scalar();
    const std::string at = "sweep." + path;
    if (path.size() > 256) return FieldError(source, it->first, "sweep", "a field path is at most 256 characters");
    auto chain = SweepFieldChain(path);
    if (!chain.ok()) return FieldError(source, it->first, at, chain.status().message());
    for (const v1::SweepAxis& axis : e->sweep()) {
      if (axis.path() == path) return FieldError(source, it->first, at, "given twice");
    }
    const YAML::Node values = it->second;
    if (!values.IsSequence() || values.size() == 0) {
      return FieldError(source, values, at, "expected a non-empty list of values, e.g. [1, 2]");
    }
    v1::SweepAxis* axis = e->add_sweep();
    axis->set_path(path);
    for (size_t i = 0; i < values.size(); ++i) {
      const std::string item = at + "[" + std::to_string(i) + "]";
      v1::Experiment scratch;
      RETURN_IF_ERROR(SetSweepValue(*chain, values[i], &scratch, item, source));
      axis->add_values(values[i].Scalar());
    }
  }
  return OkStatus();
}

std::string Num(double v) {
  char b[32];
  std::snprintf(b, sizeof b, "%g", v);
  return b;
}

// The names of an enum's values (lower case, without the unspecified 0), for messages.
std::string KnownValues(const pb::EnumDescriptor* e) {
  std::string known;
  for (int i = 0; i < e->value_count(); ++i) {
    if (e->value(i)->number() == 0) continue;
    known += (known.empty() ? "" : ", ") + Lower(e->value(i)->name());
  }
  return known;
}

// The largest number of training tokens the text at `paths` can give: each byte is one
// token, and each file adds at most one end-of-text token. Stops counting at `enough`.
StatusOr<int64_t> TextTokenBound(const v1::TextData& text, int64_t enough, const std::function<bool()>& stop) {
  namespace fs = std::filesystem;
  int64_t total = 0;
  auto add = [&](const fs::path& p, std::error_code& ec) {
    const auto size = fs::file_size(p, ec);
    if (!ec) total += static_cast<int64_t>(size) + 1;
  };
  for (int i = 0; i < text.paths_size() && total < enough; ++i) {
    const std::string field = "data.text.paths[" + std::to_string(i) + "]";
    std::error_code ec;
    const fs::file_status st = fs::status(text.paths(i), ec);
    if (ec || !fs::exists(st)) return InvalidArgumentError(field + ": no such file or folder: " + text.paths(i));
    if (!fs::is_directory(st)) {
      add(text.paths(i), ec);
      if (ec) return InvalidArgumentError(field + ": cannot read " + text.paths(i) + ": " + ec.message());
      continue;
    }
    fs::recursive_directory_iterator it(text.paths(i), fs::directory_options::none, ec);
    if (ec) return InvalidArgumentError(field + ": cannot list " + text.paths(i) + ": " + ec.message());
    int64_t listed = 0;
    for (; it != fs::recursive_directory_iterator() && total < enough; it.increment(ec)) {
      if (ec) break;
      if (stop && ++listed % 256 == 0 && stop()) {
        return CancelledError(field + ": the check stopped after " + std::to_string(listed) +
                              " entries of " + text.paths(i) + ": the client cancelled or its deadline passed");
      }
      std::error_code type_ec;
      if (!it->is_regular_file(type_ec)) continue;
      const std::string name = it->path().filename().string();
      const bool excluded = std::any_of(text.exclude_suffixes().begin(), text.exclude_suffixes().end(),
                                        [&](const std::string& suffix) {
                                          return !suffix.empty() && name.size() >= suffix.size() &&
                                                 name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
                                        });
      if (excluded) continue;
      std::error_code size_ec;
      add(it->path(), size_ec);
    }
    if (ec) return InvalidArgumentError(field + ": cannot list " + text.paths(i) + ": " + ec.message());
  }
  return total;
}

// Tokens in the llm.c shards matching `pattern`, from their headers.
StatusOr<int64_t> ShardTokens(const std::string& pattern, const std::string& field) {
  auto paths = ExpandGlob(pattern);
  if (!paths.ok()) return InvalidArgumentError(field + ": " + paths.status().message());
  int64_t total = 0;
  for (const std::string& path : *paths) {
    // Only a regular file is opened, and without blocking: a FIFO or a device named as data
    // would otherwise hold this thread (and the coordinator's shutdown) until it has a
    // writer. O_NONBLOCK covers the race of the file being replaced after the check.
    struct stat st;
    if (::stat(path.c_str(), &st) != 0) {
      return InvalidArgumentError(field + ": " + path + ": " + std::strerror(errno));
    }
    if (!S_ISREG(st.st_mode)) return InvalidArgumentError(field + ": " + path + ": not a regular file");
    const int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) return InvalidArgumentError(field + ": " + path + ": cannot open: " + std::strerror(errno));
    int32_t header[3] = {0, 0, 0};
    struct stat opened;
    const bool regular = ::fstat(fd, &opened) == 0 && S_ISREG(opened.st_mode);
    const ssize_t got = regular ? ::pread(fd, header, sizeof header, 0) : -1;
    ::close(fd);
    if (!regular) return InvalidArgumentError(field + ": " + path + ": not a regular file");
    if (got != static_cast<ssize_t>(sizeof header)) {
      return InvalidArgumentError(field + ": " + path + ": too short for an llm.c shard header");
    }
    // The file's bytes are not echoed: a path the client names may hold anything.
    if (!((header[0] == kShardMagicV1 && header[1] == 1) || (header[0] == kShardMagicV7 && header[1] == 7))) {
      return InvalidArgumentError(field + ": " + path +
                                  ": not an llm.c shard (its header has neither the llm.c magic number " +
                                  std::to_string(kShardMagicV1) + " with version 1 nor " +
                                  std::to_string(kShardMagicV7) + " with version 7)");
    }
    if (header[2] < 0) return InvalidArgumentError(field + ": " + path + ": negative token count in its header");
    total += header[2];
  }
  return total;
}

// The data holds one window of model.context + 1 tokens in its training split (and in
// its validation split, where that is known without reading the data): what the worker
// needs to draw a batch.
Status CheckDataHoldsContext(const v1::Experiment& e, const std::function<bool()>& stop) {
  const int64_t need = static_cast<int64_t>(e.model().context()) + 1;
  const std::string rule = "model.context: " + std::to_string(e.model().context()) + " needs windows of " +
                           "model.context + 1 = " + std::to_string(need) + " tokens, but ";
  const v1::DataSpec& d = e.data();
  if (d.has_text()) {
    ASSIGN_OR_RETURN(const int64_t bound, TextTokenBound(d.text(), need, stop));
    if (bound < need) {
      return InvalidArgumentError(rule + "data.text.paths hold at most " + std::to_string(bound) +
                                  " byte-level tokens");
    }
    return OkStatus();
  }
  ASSIGN_OR_RETURN(const int64_t total, ShardTokens(d.shards().train(), "data.shards.train"));
  int64_t train = total, val = 0;
  std::string val_what;
  if (!d.shards().val().empty()) {
    ASSIGN_OR_RETURN(val, ShardTokens(d.shards().val(), "data.shards.val"));
    val_what = "data.shards.val (" + d.shards().val() + ") holds";
  } else {
    auto held = HeldOutCount(static_cast<size_t>(total), d.val_fraction(), "data.shards.train", "tokens");
    if (!held.ok()) return InvalidArgumentError(rule + held.status().message());
    val = static_cast<int64_t>(*held);
    train = total - val;
    val_what = "the validation split (data.val_fraction " + Num(d.val_fraction()) + " of data.shards.train) holds";
  }
  if (train < need) {
    return InvalidArgumentError(rule + "the training split of data.shards.train (" + d.shards().train() +
                                ") holds " + std::to_string(train));
  }
  if (val > 0 && val < need) return InvalidArgumentError(rule + val_what + " " + std::to_string(val));
  return OkStatus();
}

}  // namespace

StatusOr<v1::Experiment> ParseExperimentText(const std::string& text, const std::string& source) {
  YAML::Node root;
  try {
    root = YAML::Load(text);
  } catch (const YAML::DeepRecursion& e) {
    // yaml-cpp's guard says only "bad file": name what is wrong (an experiment file is a
    // few levels deep; the parser stops at 2,000 of its levels, about 1,000 of nesting).
    return InvalidArgumentError(source + ":" + std::to_string(e.mark.line + 1) +
                                ": nested too deeply (over 1,000 levels of mappings or lists; an experiment file "
                                "needs at most 4)");
  } catch (const YAML::ParserException& e) {
    return InvalidArgumentError(source + ":" + std::to_string(e.mark.line + 1) + ": not valid YAML or JSON: " + e.msg);
  }
  if (!root.IsDefined() || root.IsNull()) return InvalidArgumentError(source + ": the file is empty");
  v1::Experiment experiment;
  RETURN_IF_ERROR(YamlToMessage(root, &experiment, "", source));
  return experiment;
}

StatusOr<v1::Experiment> LoadExperimentFile(const std::string& path) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) {
    return InvalidArgumentError(path + ": is a folder, not an experiment file (YAML or JSON)");
  }
  // An experiment file is text of a few kilobytes; 4 MiB is far more than any needs.
  ASSIGN_OR_RETURN(const std::string text, ReadRegularFile(path, path, int64_t{4} << 20));
  ASSIGN_OR_RETURN(v1::Experiment e, ParseExperimentText(text, path));
  // Relative data paths are relative to the experiment file.
  const std::filesystem::path base = std::filesystem::path(path).parent_path();
  auto resolve = [&](std::string* p) {
    if (!p->empty() && (*p)[0] != '/') *p = (base / *p).lexically_normal().string();
  };
  if (e.data().has_text()) {
    for (auto& p : *e.mutable_data()->mutable_text()->mutable_paths()) resolve(&p);
  }
  if (e.data().has_shards()) {
    resolve(e.mutable_data()->mutable_shards()->mutable_train());
    if (!e.data().shards().val().empty()) resolve(e.mutable_data()->mutable_shards()->mutable_val());
  }
  return e;
}

void ApplyDefaults(v1::Experiment& e) {
  v1::ModelSpec& m = *e.mutable_model();
  if (!m.has_layers()) m.set_layers(4);
  if (!m.has_d_model()) m.set_d_model(128);
  if (!m.has_heads()) m.set_heads(4);
  if (!m.has_kv_heads()) m.set_kv_heads(m.heads());
  if (!m.has_head_dim()) m.set_head_dim(m.heads() > 0 ? m.d_model() / m.heads() : 0);
  if (!m.has_ffn()) {  // in 64 bits: a huge d_model must not overflow (validation rejects what does not fit)
    const int64_t ffn = ((static_cast<int64_t>(m.d_model()) * 8 / 3) + 31) / 32 * 32;
    m.set_ffn(static_cast<int32_t>(std::clamp<int64_t>(ffn, INT32_MIN, INT32_MAX)));
  }
  if (!m.has_vocab()) m.set_vocab(kByteVocab);
  if (!m.has_context()) m.set_context(128);
  if (!m.has_rope_theta()) m.set_rope_theta(10000.0);
  if (!m.has_rms_eps()) m.set_rms_eps(1e-5);
  if (!m.has_init_std()) m.set_init_std(0.02);
  if (!m.has_tied_embeddings()) m.set_tied_embeddings(false);
  if (!m.has_sink_logit_init()) m.set_sink_logit_init(0.0);
  // Ramapuram et al.: b = −log n for sequences of n tokens; n is the training context.
  if (!m.has_sigmoid_bias()) m.set_sigmoid_bias(m.context() > 0 ? -std::log(static_cast<double>(m.context())) : 0.0);
  if (!m.has_softpick_eps()) m.set_softpick_eps(1e-6);

  v1::DataSpec& d = *e.mutable_data();
  if (!d.has_val_fraction()) d.set_val_fraction(0.05);
  if (!d.has_bos()) d.set_bos(false);
  if (!d.has_bos_token()) d.set_bos_token(d.has_shards() ? kGpt2EndOfText : kEndOfText);
  if (d.has_text()) {
    if (!d.text().has_separator()) d.mutable_text()->set_separator("%");
    if (d.text().exclude_suffixes().empty()) {
      d.mutable_text()->add_exclude_suffixes(".dat");
      d.mutable_text()->add_exclude_suffixes(".u8");
    }
  }

  v1::TrainSpec& t = *e.mutable_train();
  if (!t.has_steps()) t.set_steps(200);
  if (!t.has_micro_batch()) t.set_micro_batch(8);
  if (!t.has_grad_accum()) t.set_grad_accum(1);
  if (!t.has_lr()) t.set_lr(3e-3);
  if (!t.has_min_lr()) t.set_min_lr(t.lr() / 10);
  if (!t.has_warmup_steps()) t.set_warmup_steps(t.steps() / 10);
  if (!t.has_beta1()) t.set_beta1(0.9);
  if (!t.has_beta2()) t.set_beta2(0.95);
  if (!t.has_eps()) t.set_eps(1e-8);
  if (!t.has_weight_decay()) t.set_weight_decay(0.1);
  if (!t.has_grad_clip()) t.set_grad_clip(1.0);
  if (!t.has_eval_every()) t.set_eval_every(50);
  if (!t.has_eval_batches()) t.set_eval_batches(8);

  v1::ProbeSpec& p = *e.mutable_probe();
  if (!p.has_every()) p.set_every(50);
  if (!p.has_sink_position()) p.set_sink_position(0);
  if (!p.has_ref_span()) {
    p.set_ref_span(static_cast<int32_t>(std::clamp<int64_t>(int64_t{m.context()} - 1, INT32_MIN, 31)));
  }
  if (!p.has_profile_len()) p.set_profile_len(std::min(64, m.context()));
  if (!p.has_eps()) p.set_eps(0.3);
  if (!p.has_t_eps()) p.set_t_eps(64);
  if (p.reduce() == v1::REDUCE_UNSPECIFIED) p.set_reduce(v1::SUM_THEN_NORM);
  if (p.batch() == v1::PROBE_BATCH_UNSPECIFIED) p.set_batch(v1::STEP_BATCH);

  v1::Resources& r = *e.mutable_resources();
  if (r.device() == v1::DEVICE_KIND_UNSPECIFIED) r.set_device(v1::CPU);
  if (!r.has_devices_per_run()) r.set_devices_per_run(1);

  if (e.arms().empty()) {
    e.add_arms(v1::BASELINE);
    e.add_arms(v1::VSCALE);
  }
  if (e.seeds().empty()) e.add_seeds(0);
  if (!e.has_max_restarts()) e.set_max_restarts(2);
  v1::CheckpointSpec& c = *e.mutable_checkpoint();
  if (!c.has_every()) c.set_every(100);
  if (!c.has_export_hf()) c.set_export_hf(true);
  if (e.has_diagnostic()) {  // one run that makes one pass
    v1::DiagnosticSpec& g = *e.mutable_diagnostic();
    if (g.separator().empty()) g.set_separator("%");
    if (!g.has_batch()) g.set_batch(8);
    if (!g.has_seq()) g.set_seq(0);
    if (!g.has_micro_batch()) g.set_micro_batch(0);
    e.clear_arms();
    e.add_arms(g.arm() == v1::ARM_UNSPECIFIED ? v1::BASELINE : g.arm());
    e.clear_seeds();
    e.add_seeds(0);
    t.set_steps(1);
    t.set_warmup_steps(0);
    c.set_export_hf(false);
  }
}

int64_t SweepPointCount(const v1::Experiment& e) {
  int64_t n = 1;
  for (const v1::SweepAxis& axis : e.sweep()) {
    n *= std::max(1, axis.values_size());
    if (n > (int64_t{1} << 40)) return n;  // far past any bound; no overflow
  }
  return n;
}

Status ValidateSweep(const v1::Experiment& e) {
  if (e.sweep_size() > kMaxSweepAxes) {
    return InvalidArgumentError("sweep: " + std::to_string(e.sweep_size()) + " axes, at most " +
                                std::to_string(kMaxSweepAxes));
  }
  for (int i = 0; i < e.sweep_size(); ++i) {
    const v1::SweepAxis& axis = e.sweep(i);
    const std::string at = "sweep[" + std::to_string(i) + "]";
    if (axis.path().size() > 256 || !IsUtf8(axis.path())) {
      return InvalidArgumentError(at + ".path: a field path of at most 256 characters of UTF-8");
    }
    auto chain = SweepFieldChain(axis.path());
    if (!chain.ok()) return InvalidArgumentError("sweep." + axis.path() + ": " + chain.status().message());
    for (int j = 0; j < i; ++j) {
      if (e.sweep(j).path() == axis.path()) return InvalidArgumentError("sweep." + axis.path() + ": given twice");
    }
    if (axis.values().empty()) return InvalidArgumentError("sweep." + axis.path() + ": needs at least one value");
    if (axis.values_size() > kMaxSweepValues) {
      return InvalidArgumentError("sweep." + axis.path() + ": " + std::to_string(axis.values_size()) +
                                  " values, at most " + std::to_string(kMaxSweepValues));
    }
    for (int k = 0; k < axis.values_size(); ++k) {
      const std::string item = "sweep." + axis.path() + "[" + std::to_string(k) + "]";
      if (axis.values(k).size() > kMaxPathBytes || !IsUtf8(axis.values(k))) {
        return InvalidArgumentError(item + ": a value of at most " + std::to_string(kMaxPathBytes) +
                                    " characters of UTF-8");
      }
      for (int j = 0; j < k; ++j) {
        if (axis.values(j) == axis.values(k)) {
          return InvalidArgumentError(item + ": repeats value " + std::to_string(j) + " (" + axis.values(k) + ")");
        }
      }
      v1::Experiment scratch;
      Status st = SetSweepValue(*chain, YAML::Node(axis.values(k)), &scratch, item, "");
      if (!st.ok()) return InvalidArgumentError(std::string(st.message()).substr(2));  // drop the empty source's ": "
    }
  }
  return OkStatus();
}

StatusOr<v1::Experiment> SweepPointExperiment(const v1::Experiment& submitted, int64_t index, std::string* label) {
  const int64_t points = SweepPointCount(submitted);
  if (index < 0 || index >= points) {
    return InvalidArgumentError("sweep point " + std::to_string(index) + " is outside the grid of " +
                                std::to_string(points) + " points");
  }
  v1::Experiment e = submitted;
  e.clear_sweep();
  std::string text;
  // The first axis slowest: index = ((i0·n1 + i1)·n2 + i2)…
  std::vector<int> digits(submitted.sweep_size());
  for (int a = submitted.sweep_size() - 1; a >= 0; --a) {
    const int n = submitted.sweep(a).values_size();
    digits[a] = static_cast<int>(index % n);
    index /= n;
  }
  for (int a = 0; a < submitted.sweep_size(); ++a) {
    const v1::SweepAxis& axis = submitted.sweep(a);
    ASSIGN_OR_RETURN(auto chain, SweepFieldChain(axis.path()));
    const std::string& value = axis.values(digits[a]);
    Status st = SetSweepValue(chain, YAML::Node(value), &e, "sweep." + axis.path(), "");
    if (!st.ok()) return InvalidArgumentError(std::string(st.message()).substr(2));
    text += (a ? " " : "") + axis.path() + "=" + value;
  }
  ApplyDefaults(e);
  if (label != nullptr) *label = text;
  return e;
}

std::string FormatBytes(double bytes) {
  static const char* const kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  int u = 0;
  while (bytes >= 1024 && u < 6) bytes /= 1024, ++u;
  char buf[48];
  std::snprintf(buf, sizeof buf, u == 0 ? "%.0f %s" : "%.1f %s", bytes, kUnits[u]);
  return buf;
}

RunMemoryEstimate EstimateRunMemory(const v1::Experiment& e) {
  const ModelConfig c = ToModelConfig(e.model(), v1::BASELINE);  // the arm does not change the sizes
  RunMemoryEstimate r;
  r.parameters = c.ParameterCount();
  r.parameter_bytes = 16 * r.parameters;
  // Per rank: a data-parallel rank holds the whole model but only its share of the rows.
  const int ranks = std::max(1, e.resources().devices_per_run());
  r.micro_batch = std::max(1, e.train().micro_batch() / ranks);
  r.context = e.model().context();
  r.activation_bytes = c.ActivationBytes(r.micro_batch, e.model().context());
  return r;
}

std::string RunMemoryEstimate::Describe() const {
  auto count = [](double n) {
    char buf[32];
    if (n >= 1e12) std::snprintf(buf, sizeof buf, "%.1fT", n / 1e12);
    else if (n >= 1e9) std::snprintf(buf, sizeof buf, "%.1fB", n / 1e9);
    else if (n >= 1e6) std::snprintf(buf, sizeof buf, "%.1fM", n / 1e6);
    else std::snprintf(buf, sizeof buf, "%.0f", n);
    return std::string(buf);
  };
  return count(parameters) + " parameters need about " + FormatBytes(total_bytes()) +
         " to train (parameters, gradients and AdamW state at 16 B per parameter " + FormatBytes(parameter_bytes) +
         ", activations of one micro-batch of " + std::to_string(micro_batch) + " x " + std::to_string(context) +
         " tokens " + FormatBytes(activation_bytes) + ")";
}

namespace {

// A diagnostic probe job: its own fields, the probe settings that do not depend on the
// model (the worker checks the rest against the model it loads), the device and arm.
Status ValidateDiagnostic(const v1::Experiment& e, bool check_paths) {
  auto bad = [](const std::string& path, const std::string& rule) { return InvalidArgumentError(path + ": " + rule); };
  const v1::DiagnosticSpec& g = e.diagnostic();
  for (const auto& [path, value] : {std::pair<const char*, const std::string*>{"diagnostic.model", &g.model()},
                                    {"diagnostic.tokens", &g.tokens()}, {"diagnostic.text", &g.text()},
                                    {"diagnostic.separator", &g.separator()}, {"diagnostic.tokenizer", &g.tokenizer()}}) {
    if (!IsUtf8(*value)) return bad(path, "is not valid UTF-8");
  }
  if (g.model().empty()) return bad("diagnostic.model", "is required (a Hugging Face folder or a checkpoint.bin)");
  if (g.tokens().empty() == g.text().empty()) return bad("diagnostic", "needs exactly one of tokens and text");
  if (g.batch() <= 0 || g.batch() > (1 << 20)) {
    return bad("diagnostic.batch", "must be in [1, 2^20], got " + std::to_string(g.batch()));
  }
  if (g.seq() < 0) return bad("diagnostic.seq", "must not be negative, got " + std::to_string(g.seq()));
  if (g.micro_batch() < 0) {
    return bad("diagnostic.micro_batch", "must not be negative, got " + std::to_string(g.micro_batch()));
  }
  if (!v1::Arm_IsValid(g.arm())) return bad("diagnostic.arm", "unknown arm " + std::to_string(g.arm()));
  if (IsAttentionArm(g.arm())) {
    return bad("diagnostic.arm", std::string(ArmName(g.arm())) +
                                     " changes the architecture; diagnostic.arm selects the value path only "
                                     "(baseline, vscale, vscale_backward_only) and a checkpoint's attention arm is "
                                     "its own");
  }
  const v1::ProbeSpec& p = e.probe();
  if (p.sink_position() < 0) return bad("probe.sink_position", "must not be negative");
  if (p.ref_span() <= 0) return bad("probe.ref_span", "must be positive");
  if (p.profile_len() <= 0) return bad("probe.profile_len", "must be positive");
  if (!(p.eps() > 0 && p.eps() < 1)) return bad("probe.eps", "must be in (0, 1), got " + Num(p.eps()));
  if (p.t_eps() <= 0) return bad("probe.t_eps", "must be positive, got " + std::to_string(p.t_eps()));
  if (!v1::Reduce_IsValid(p.reduce()) || p.reduce() == v1::REDUCE_UNSPECIFIED) {
    return bad("probe.reduce", "unknown value " + std::to_string(p.reduce()));
  }
  if (!v1::DeviceKind_IsValid(e.resources().device()) || e.resources().device() == v1::DEVICE_KIND_UNSPECIFIED) {
    return bad("resources.device", "unknown value " + std::to_string(e.resources().device()));
  }
  if (e.resources().devices_per_run() != 1) {
    return bad("resources.devices_per_run", "a diagnostic probe job runs on one device, got " +
                                                std::to_string(e.resources().devices_per_run()));
  }
  if (e.max_restarts() < 0) return bad("max_restarts", "must not be negative, got " + std::to_string(e.max_restarts()));
  if (check_paths) {
    std::error_code ec;
    if (!std::filesystem::exists(g.model(), ec)) return bad("diagnostic.model", "no such file or folder: " + g.model());
    const std::string& batch = g.tokens().empty() ? g.text() : g.tokens();
    if (!std::filesystem::exists(batch, ec)) {
      return bad(g.tokens().empty() ? "diagnostic.text" : "diagnostic.tokens", "no such file or folder: " + batch);
    }
  }
  return OkStatus();
}

}  // namespace

int64_t ProbeReportBoundBytes(const v1::Experiment& e) {
  const int64_t P = e.probe().profile_len(), heads = e.model().heads(), kv = e.model().kv_heads();
  constexpr int64_t kPerTokenSeries = 6 + 9 + 7;  // Bloat/Change/Compress; grad_profile sites; norms
  const int64_t per_layer = kPerTokenSeries * (8 * P + 32)  // packed doubles, tag, length, map key
                            + 8 * (8 * heads + 8)           // alpha, column mass, second moment, per-sample fraction;
                                                            // the arms' unassigned mass, gate mean/sink/rest
                            + 2 * (8 * kv + 8)              // θ, C
                            + 7 * 24                        // norm_ratio entries
                            + 256;                          // scalars, massive activations, the layer's envelope
  return e.model().layers() * per_layer + 1024;
}

Status CheckProbeReportFits(const v1::Experiment& e) {
  if (e.has_diagnostic() || e.probe().every() <= 0) return OkStatus();
  const int64_t bound = ProbeReportBoundBytes(e);
  if (bound <= kMaxProbeReportBytes) return OkStatus();
  // A report that cannot be sent would be retried forever: refused here, naming the settings.
  return InvalidArgumentError("probe.profile_len: a probe report of " + std::to_string(e.model().layers()) +
                              " layers with P = " + std::to_string(e.probe().profile_len()) + " may reach " +
                              std::to_string(bound) + " bytes, over the " + std::to_string(kMaxProbeReportBytes) +
                              " a report may take (the gRPC message limit); lower probe.profile_len or model.layers");
}

Status ValidateExperiment(const v1::Experiment& e, bool check_paths, const std::function<bool()>& stop) {
  auto bad = [](const std::string& path, const std::string& rule) { return InvalidArgumentError(path + ": " + rule); };
  // Real numbers: finite, and positive (or not negative).
  auto positive = [&](const char* path, double v) -> Status {
    if (!(v > 0) || !std::isfinite(v)) return bad(path, "must be positive and finite, got " + Num(v));
    return OkStatus();
  };
  auto not_negative = [&](const char* path, double v) -> Status {
    if (!(v >= 0) || !std::isfinite(v)) return bad(path, "must be finite and not negative, got " + Num(v));
    return OkStatus();
  };
  if (e.name().empty()) return bad("name", "is required");
  // Run folders are <experiment>-<n>-<arm>-s<seed>: keep them well inside NAME_MAX.
  if (e.name().size() > 100) {
    return bad("name", "must be at most 100 characters, got " + std::to_string(e.name().size()));
  }
  for (char ch : e.name()) {
    if (!std::isalnum(static_cast<unsigned char>(ch)) && ch != '-' && ch != '_' && ch != '.') {
      return bad("name", "may hold only letters, digits, '-', '_' and '.', got byte " +
                             std::to_string(static_cast<unsigned char>(ch)) + " at offset " +
                             std::to_string(&ch - e.name().data()));
    }
  }
  if (e.has_diagnostic()) {
    if (e.sweep_size() > 0) return bad("sweep", "a diagnostic probe job is one run: it takes no sweep");
    return ValidateDiagnostic(e, check_paths);
  }
  const v1::ModelSpec& m = e.model();
  struct Positive {
    const char* path;
    int64_t value;
  };
  for (const Positive& p : {Positive{"model.layers", m.layers()}, Positive{"model.d_model", m.d_model()},
                            Positive{"model.heads", m.heads()}, Positive{"model.kv_heads", m.kv_heads()},
                            Positive{"model.head_dim", m.head_dim()}, Positive{"model.ffn", m.ffn()},
                            Positive{"model.vocab", m.vocab()}, Positive{"model.context", m.context()},
                            Positive{"train.steps", e.train().steps()},
                            Positive{"train.micro_batch", e.train().micro_batch()},
                            Positive{"train.grad_accum", e.train().grad_accum()},
                            Positive{"train.eval_batches", e.train().eval_batches()},
                            Positive{"resources.devices_per_run", e.resources().devices_per_run()}}) {
    if (p.value <= 0) return bad(p.path, "must be positive, got " + std::to_string(p.value));
  }
  // Sizes no run could hold are refused here, naming the field, rather than failing on a
  // worker (an allocation of 10⁹ × d floats); what fits a worker is checked at submission
  // against the connected workers' memory.
  struct AtMost {
    const char* path;
    int64_t value, limit;
  };
  for (const AtMost& a : {AtMost{"model.layers", m.layers(), 4096}, AtMost{"model.d_model", m.d_model(), 1 << 17},
                          AtMost{"model.heads", m.heads(), 4096}, AtMost{"model.head_dim", m.head_dim(), 1024},
                          AtMost{"model.ffn", m.ffn(), 1 << 20}, AtMost{"model.vocab", m.vocab(), 1 << 24},
                          AtMost{"model.context", m.context(), 1 << 20},
                          AtMost{"train.micro_batch", e.train().micro_batch(), 1 << 16},
                          AtMost{"train.grad_accum", e.train().grad_accum(), 1 << 16}}) {
    if (a.value > a.limit) {
      return bad(a.path, "must be at most " + std::to_string(a.limit) + ", got " + std::to_string(a.value));
    }
  }
  if (e.resources().devices_per_run() > 1024) {
    return bad("resources.devices_per_run", "must be at most 1024, got " + std::to_string(e.resources().devices_per_run()));
  }
  if (e.train().micro_batch() % e.resources().devices_per_run() != 0) {
    return bad("train.micro_batch", "(" + std::to_string(e.train().micro_batch()) +
                                        ") must be a multiple of resources.devices_per_run (" +
                                        std::to_string(e.resources().devices_per_run()) +
                                        "): each rank trains an equal share of every micro-batch");
  }
  if (m.heads() % m.kv_heads() != 0) {
    return bad("model.kv_heads", "must divide model.heads (" + std::to_string(m.heads()) + "), got " +
                                     std::to_string(m.kv_heads()));
  }
  if (m.head_dim() % 2 != 0) return bad("model.head_dim", "must be even for RoPE, got " + std::to_string(m.head_dim()));
  RETURN_IF_ERROR(positive("model.rope_theta", m.rope_theta()));
  RETURN_IF_ERROR(positive("model.rms_eps", m.rms_eps()));
  RETURN_IF_ERROR(positive("model.init_std", m.init_std()));
  // The attention arms' parameters (docs/design/ARMS.md "Ranges"), checked whichever arms run.
  if (!(std::isfinite(m.sink_logit_init()) && std::abs(m.sink_logit_init()) <= 20)) {
    return bad("model.sink_logit_init", "must be finite and in [-20, 20], got " + Num(m.sink_logit_init()));
  }
  if (!(std::isfinite(m.sigmoid_bias()) && std::abs(m.sigmoid_bias()) <= 30)) {
    return bad("model.sigmoid_bias", "must be finite and in [-30, 30], got " + Num(m.sigmoid_bias()));
  }
  if (!(m.softpick_eps() > 0 && m.softpick_eps() <= 1)) {
    return bad("model.softpick_eps", "must be in (0, 1], got " + Num(m.softpick_eps()));
  }

  const v1::DataSpec& d = e.data();
  if (d.source_case() == v1::DataSpec::SOURCE_NOT_SET) return bad("data", "needs data.text or data.shards");
  // Bounds before any work: a submission's memory and the cost of matching files against
  // it follow from them.
  if (d.text().separator().size() > kMaxSeparatorBytes) {
    return bad("data.text.separator", "is " + std::to_string(d.text().separator().size()) + " bytes long, at most " +
                                          std::to_string(kMaxSeparatorBytes));
  }
  if (d.text().exclude_suffixes_size() > kMaxExcludeSuffixes) {
    return bad("data.text.exclude_suffixes", "lists " + std::to_string(d.text().exclude_suffixes_size()) +
                                                 " suffixes, at most " + std::to_string(kMaxExcludeSuffixes));
  }
  for (int i = 0; i < d.text().exclude_suffixes_size(); ++i) {
    if (d.text().exclude_suffixes(i).size() > kMaxSuffixBytes) {
      return bad("data.text.exclude_suffixes[" + std::to_string(i) + "]",
                 "is " + std::to_string(d.text().exclude_suffixes(i).size()) + " bytes long, at most " +
                     std::to_string(kMaxSuffixBytes));
    }
  }
  for (const auto& [path, value] : {std::pair<const char*, const std::string*>{"data.shards.train", &d.shards().train()},
                                    {"data.shards.val", &d.shards().val()}}) {
    if (value->size() > kMaxPathBytes) {
      return bad(path, "is " + std::to_string(value->size()) + " bytes long, at most " + std::to_string(kMaxPathBytes));
    }
  }
  {  // every string: proto3 strings must be UTF-8 to be sent and stored
    std::vector<std::pair<std::string, const std::string*>> strings = {
        {"data.text.separator", &d.text().separator()},
        {"data.shards.train", &d.shards().train()},
        {"data.shards.val", &d.shards().val()}};
    for (int i = 0; i < d.text().paths_size(); ++i) {
      strings.emplace_back("data.text.paths[" + std::to_string(i) + "]", &d.text().paths(i));
    }
    for (int i = 0; i < d.text().exclude_suffixes_size(); ++i) {
      strings.emplace_back("data.text.exclude_suffixes[" + std::to_string(i) + "]", &d.text().exclude_suffixes(i));
    }
    for (const auto& [path, value] : strings) {
      if (!IsUtf8(*value)) return bad(path, "is not valid UTF-8");
    }
  }
  if (!(d.val_fraction() >= 0 && d.val_fraction() <= 0.5)) {
    return bad("data.val_fraction", "must be in [0, 0.5], got " + Num(d.val_fraction()));
  }
  if (d.bos() && (d.bos_token() < 0 || d.bos_token() >= m.vocab())) {
    return bad("data.bos_token", "must be a token of the vocabulary, in [0, model.vocab " + std::to_string(m.vocab()) +
                                     "), got " + std::to_string(d.bos_token()));
  }
  if (d.has_text()) {
    if (d.text().paths().empty()) return bad("data.text.paths", "needs at least one file or folder");
    if (d.text().paths_size() > kMaxDataPaths) {
      return bad("data.text.paths", "lists " + std::to_string(d.text().paths_size()) + " paths, at most " +
                                        std::to_string(kMaxDataPaths) + " (name folders instead of their files)");
    }
    std::map<std::string, int> first_path;  // normalised path → its first index
    for (int i = 0; i < d.text().paths_size(); ++i) {
      const std::string at = "data.text.paths[" + std::to_string(i) + "]";
      if (d.text().paths(i).empty()) return bad(at, "is empty");
      if (d.text().paths(i).size() > kMaxPathBytes) {
        return bad(at, "is " + std::to_string(d.text().paths(i).size()) + " bytes long, at most " +
                           std::to_string(kMaxPathBytes));
      }
      const std::string norm = std::filesystem::path(d.text().paths(i)).lexically_normal().string();
      if (auto [it, fresh] = first_path.try_emplace(norm, i); !fresh) {
        return bad(at, "repeats data.text.paths[" + std::to_string(it->second) + "] (" + d.text().paths(i) + ")");
      }
    }
    if (m.vocab() < kByteVocab) {
      return bad("model.vocab", "must be at least 257 for byte-level text, got " + std::to_string(m.vocab()));
    }
    if (check_paths) {
      for (int i = 0; i < d.text().paths_size(); ++i) {
        std::error_code ec;  // a symlink loop or an over-long name is an error code, not an exception
        if (!std::filesystem::exists(d.text().paths(i), ec)) {
          return bad("data.text.paths[" + std::to_string(i) + "]",
                     (ec ? "cannot be checked (" + ec.message() + "): " : "no such file or folder: ") +
                         d.text().paths(i));
        }
      }
    }
  } else {
    if (d.shards().train().empty()) return bad("data.shards.train", "is required");
    if (check_paths) {
      auto train = ExpandGlob(d.shards().train());
      if (!train.ok()) return bad("data.shards.train", train.status().message());
      if (!d.shards().val().empty()) {
        auto val = ExpandGlob(d.shards().val());
        if (!val.ok()) return bad("data.shards.val", val.status().message());
      }
    }
  }

  const v1::TrainSpec& t = e.train();
  RETURN_IF_ERROR(positive("train.lr", t.lr()));
  if (!(t.min_lr() >= 0 && t.min_lr() <= t.lr())) {
    return bad("train.min_lr", "must be in [0, train.lr] = [0, " + Num(t.lr()) + "], got " + Num(t.min_lr()));
  }
  if (t.warmup_steps() < 0) return bad("train.warmup_steps", "must not be negative");
  if (t.warmup_steps() > t.steps()) return bad("train.warmup_steps", "must not exceed train.steps");
  if (!(t.beta1() >= 0 && t.beta1() < 1)) return bad("train.beta1", "must be in [0, 1), got " + Num(t.beta1()));
  if (!(t.beta2() >= 0 && t.beta2() < 1)) return bad("train.beta2", "must be in [0, 1), got " + Num(t.beta2()));
  RETURN_IF_ERROR(positive("train.eps", t.eps()));
  RETURN_IF_ERROR(not_negative("train.weight_decay", t.weight_decay()));
  RETURN_IF_ERROR(not_negative("train.grad_clip", t.grad_clip()));  // 0 disables clipping
  if (t.eval_every() < 0) return bad("train.eval_every", "must not be negative");
  RETURN_IF_ERROR(ToOptimizerConfig(t).Validate());  // the engine's own rules (implied by the above)

  const v1::ProbeSpec& p = e.probe();
  const int T = m.context();
  if (p.every() < 0) return bad("probe.every", "must not be negative");
  if (p.sink_position() < 0 || p.sink_position() >= T) {
    return bad("probe.sink_position", "must be in [0, model.context) = [0, " + std::to_string(T) + "), got " +
                                          std::to_string(p.sink_position()));
  }
  if (p.ref_span() <= 0 || p.ref_span() >= T) {
    return bad("probe.ref_span", "T_e must be in [1, model.context) = [1, " + std::to_string(T) + "), got " +
                                     std::to_string(p.ref_span()));
  }
  if (p.sink_position() > p.ref_span()) {
    return bad("probe.sink_position", "must lie within the reference span [0, probe.ref_span] = [0, " +
                                          std::to_string(p.ref_span()) + "] (Definition 1: 0 ≤ s ≤ T_e), got " +
                                          std::to_string(p.sink_position()) + "; raise probe.ref_span");
  }
  if (p.profile_len() <= 0 || p.profile_len() > T) {
    return bad("probe.profile_len", "P must be in [1, model.context] = [1, " + std::to_string(T) + "], got " +
                                        std::to_string(p.profile_len()));
  }
  if (!(p.eps() > 0 && p.eps() < 1)) return bad("probe.eps", "must be in (0, 1), got " + Num(p.eps()));
  if (p.t_eps() <= 0) return bad("probe.t_eps", "must be positive, got " + std::to_string(p.t_eps()));
  // Enum values a client may send by number (binary protobuf keeps unknown ones).
  if (!v1::Reduce_IsValid(p.reduce()) || p.reduce() == v1::REDUCE_UNSPECIFIED) {
    return bad("probe.reduce", "unknown value " + std::to_string(p.reduce()) + " (expected one of: " +
                                   KnownValues(v1::Reduce_descriptor()) + ")");
  }
  if (!v1::ProbeBatch_IsValid(p.batch()) || p.batch() == v1::PROBE_BATCH_UNSPECIFIED) {
    return bad("probe.batch", "unknown value " + std::to_string(p.batch()) + " (expected one of: " +
                                  KnownValues(v1::ProbeBatch_descriptor()) + ")");
  }
  if (!v1::DeviceKind_IsValid(e.resources().device()) || e.resources().device() == v1::DEVICE_KIND_UNSPECIFIED) {
    return bad("resources.device", "unknown value " + std::to_string(e.resources().device()) +
                                       " (expected one of: " + KnownValues(v1::DeviceKind_descriptor()) + ")");
  }

  if (e.arms().empty()) return bad("arms", "needs at least one arm");
  for (int i = 0; i < e.arms_size(); ++i) {
    if (!v1::Arm_IsValid(e.arms(i)) || e.arms(i) == v1::ARM_UNSPECIFIED) {
      return bad("arms[" + std::to_string(i) + "]", "unknown arm " + std::to_string(e.arms(i)) +
                                                        " (expected one of: " +
                                                        KnownValues(v1::Arm_descriptor()) + ")");
    }
    for (int j = 0; j < i; ++j) {
      if (e.arms(j) == e.arms(i)) {
        return bad("arms[" + std::to_string(i) + "]", "repeats arms[" + std::to_string(j) + "]");
      }
    }
  }
  if (e.seeds().empty()) return bad("seeds", "needs at least one seed");
  RETURN_IF_ERROR(ValidateSweep(e));
  const int64_t points = SweepPointCount(e);
  if (static_cast<int64_t>(e.arms_size()) * e.seeds_size() * points > kMaxRunsPerExperiment) {
    const std::string runs = std::to_string(static_cast<int64_t>(e.arms_size()) * e.seeds_size() * points);
    if (points > 1) {
      return bad("sweep", "a grid of " + std::to_string(points) + " points x " + std::to_string(e.arms_size()) +
                              " arms x " + std::to_string(e.seeds_size()) + " seeds makes " + runs + " runs, at most " +
                              std::to_string(kMaxRunsPerExperiment) + " per experiment");
    }
    return bad("seeds", std::to_string(e.arms_size()) + " arms x " + std::to_string(e.seeds_size()) +
                            " seeds make " + runs + " runs, at most " + std::to_string(kMaxRunsPerExperiment) +
                            " per experiment");
  }
  // Runs are named <arm>-s<seed>: a repeated seed would be one run trained twice into one folder.
  std::map<uint64_t, int> first_seed;  // seed → its first index
  for (int i = 0; i < e.seeds_size(); ++i) {
    if (auto [it, fresh] = first_seed.try_emplace(e.seeds(i), i); !fresh) {
      return bad("seeds[" + std::to_string(i) + "]", "repeats seeds[" + std::to_string(it->second) + "]");
    }
  }
  if (e.max_restarts() < 0) return bad("max_restarts", "must not be negative, got " + std::to_string(e.max_restarts()));
  if (e.checkpoint().every() < 0) {
    return bad("checkpoint.every", "must not be negative, got " + std::to_string(e.checkpoint().every()));
  }
  // Last, as it reads the data's sizes: the context fits in the data.
  if (check_paths) RETURN_IF_ERROR(CheckDataHoldsContext(e, stop));
  return OkStatus();
}

namespace {

// One field of engine/config.h's list from the ModelSpec field of the same name, by the
// proto's own descriptors (a field the schema lacks keeps its default).
void FromSpec(const v1::ModelSpec& s, const char* name, int* out) {
  const pb::FieldDescriptor* f = s.GetDescriptor()->FindFieldByName(name);
  if (f != nullptr && f->cpp_type() == pb::FieldDescriptor::CPPTYPE_INT32) *out = s.GetReflection()->GetInt32(s, f);
}
void FromSpec(const v1::ModelSpec& s, const char* name, double* out) {
  const pb::FieldDescriptor* f = s.GetDescriptor()->FindFieldByName(name);
  if (f != nullptr && f->cpp_type() == pb::FieldDescriptor::CPPTYPE_DOUBLE) *out = s.GetReflection()->GetDouble(s, f);
}
void FromSpec(const v1::ModelSpec& s, const char* name, bool* out) {
  const pb::FieldDescriptor* f = s.GetDescriptor()->FindFieldByName(name);
  if (f != nullptr && f->cpp_type() == pb::FieldDescriptor::CPPTYPE_BOOL) *out = s.GetReflection()->GetBool(s, f);
}

}  // namespace

ModelConfig ToModelConfig(const v1::ModelSpec& s, v1::Arm arm) {
  ModelConfig c;
#define SINKSCOPE_FIELD_FROM_SPEC(type, name, value, hf, required) FromSpec(s, #name, &c.name);
  SINKSCOPE_MODEL_FIELDS(SINKSCOPE_FIELD_FROM_SPEC)
#undef SINKSCOPE_FIELD_FROM_SPEC
  c.vscale = VScaleMode::kNone;
  switch (arm) {
    case v1::VSCALE: c.vscale = VScaleMode::kVScale; break;
    case v1::VSCALE_BACKWARD_ONLY: c.vscale = VScaleMode::kBackwardOnly; break;
    case v1::SINK_LOGIT_VSCALE: c.vscale = VScaleMode::kVScale; [[fallthrough]];
    case v1::SINK_LOGIT: c.attention = AttentionKind::kSinkLogit; break;
    case v1::SOFTMAX_PLUS_ONE_VSCALE: c.vscale = VScaleMode::kVScale; [[fallthrough]];
    case v1::SOFTMAX_PLUS_ONE: c.attention = AttentionKind::kSoftmaxPlusOne; break;
    case v1::GATED_OUTPUT_VSCALE: c.vscale = VScaleMode::kVScale; [[fallthrough]];
    case v1::GATED_OUTPUT: c.gate = GateKind::kOutput; break;
    case v1::GATED_HEAD_VSCALE: c.vscale = VScaleMode::kVScale; [[fallthrough]];
    case v1::GATED_HEAD: c.gate = GateKind::kHead; break;
    case v1::GATED_VALUE: c.gate = GateKind::kValue; break;
    case v1::SIGMOID_VSCALE: c.vscale = VScaleMode::kVScale; [[fallthrough]];
    case v1::SIGMOID: c.attention = AttentionKind::kSigmoid; break;
    case v1::SOFTPICK_VSCALE: c.vscale = VScaleMode::kVScale; [[fallthrough]];
    case v1::SOFTPICK: c.attention = AttentionKind::kSoftpick; break;
    default: break;
  }
  return c;
}

bool IsAttentionArm(v1::Arm arm) {
  return arm != v1::ARM_UNSPECIFIED && arm != v1::BASELINE && arm != v1::VSCALE && arm != v1::VSCALE_BACKWARD_ONLY &&
         v1::Arm_IsValid(arm);
}

OptimizerConfig ToOptimizerConfig(const v1::TrainSpec& s) {
  OptimizerConfig o;
  o.lr = s.lr();
  o.min_lr = s.min_lr();
  o.warmup_steps = s.warmup_steps();
  o.total_steps = s.steps();
  o.beta1 = s.beta1();
  o.beta2 = s.beta2();
  o.eps = s.eps();
  o.weight_decay = s.weight_decay();
  o.grad_clip = s.grad_clip();
  return o;
}

const char* ArmName(v1::Arm arm) {
  switch (arm) {
    case v1::BASELINE: return "baseline";
    case v1::VSCALE: return "vscale";
    case v1::VSCALE_BACKWARD_ONLY: return "vscale_backward_only";
    case v1::SINK_LOGIT: return "sink_logit";
    case v1::SOFTMAX_PLUS_ONE: return "softmax_plus_one";
    case v1::GATED_OUTPUT: return "gated_output";
    case v1::GATED_HEAD: return "gated_head";
    case v1::GATED_VALUE: return "gated_value";
    case v1::SIGMOID: return "sigmoid";
    case v1::SOFTPICK: return "softpick";
    case v1::SINK_LOGIT_VSCALE: return "sink_logit_vscale";
    case v1::SOFTMAX_PLUS_ONE_VSCALE: return "softmax_plus_one_vscale";
    case v1::GATED_OUTPUT_VSCALE: return "gated_output_vscale";
    case v1::GATED_HEAD_VSCALE: return "gated_head_vscale";
    case v1::SIGMOID_VSCALE: return "sigmoid_vscale";
    case v1::SOFTPICK_VSCALE: return "softpick_vscale";
    default: return "unspecified";
  }
}

}  // namespace sinkscope
