// A small PNG reader for tests: enough for the screenshots headless Chromium writes (8-bit RGB
// or RGBA, not interlaced), so a test can look at the pixels of a rendered page.
#pragma once

#include <zlib.h>

#include <array>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

namespace splitq::testing {

struct Image {
  int width = 0;
  int height = 0;
  std::vector<std::array<uint8_t, 3>> rgb;  // row-major, width x height
};

// Reads an 8-bit RGB or RGBA, non-interlaced PNG (alpha dropped). Anything else is refused with
// what it is.
inline absl::StatusOr<Image> ReadPng(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const auto u8 = [&](size_t i) { return static_cast<uint8_t>(bytes[i]); };
  const auto be32 = [&](size_t i) {
    return (uint32_t{u8(i)} << 24) | (uint32_t{u8(i + 1)} << 16) | (uint32_t{u8(i + 2)} << 8) |
           u8(i + 3);
  };
  if (bytes.size() < 8 || bytes.compare(0, 8, "\x89PNG\r\n\x1a\n") != 0) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a PNG file"));
  }
  Image image;
  int channels = 0;
  std::string idat;
  for (size_t at = 8; at + 12 <= bytes.size();) {
    const uint32_t length = be32(at);
    if (at + 12 + length > bytes.size()) break;
    const std::string type = bytes.substr(at + 4, 4);
    if (type == "IHDR") {
      image.width = static_cast<int>(be32(at + 8));
      image.height = static_cast<int>(be32(at + 12));
      const int depth = u8(at + 16), color = u8(at + 17), interlace = u8(at + 20);
      if (depth != 8 || (color != 2 && color != 6) || interlace != 0) {
        return absl::UnimplementedError(absl::StrCat(path, ": PNG of depth ", depth,
                                                     ", color type ", color, ", interlace ",
                                                     interlace, " (only 8-bit RGB/RGBA)"));
      }
      channels = color == 2 ? 3 : 4;
    } else if (type == "IDAT") {
      idat.append(bytes, at + 8, length);
    }
    at += 12 + length;
  }
  if (channels == 0 || image.width <= 0 || image.height <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": no IHDR"));
  }
  const size_t stride = static_cast<size_t>(image.width) * channels;
  std::vector<uint8_t> raw((stride + 1) * image.height);
  uLongf raw_size = raw.size();
  if (uncompress(raw.data(), &raw_size, reinterpret_cast<const Bytef*>(idat.data()), idat.size()) !=
          Z_OK ||
      raw_size != raw.size()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": image data does not inflate"));
  }
  std::vector<uint8_t> prev(stride, 0), row(stride);
  image.rgb.reserve(static_cast<size_t>(image.width) * image.height);
  for (int y = 0; y < image.height; ++y) {
    const uint8_t filter = raw[y * (stride + 1)];
    const uint8_t* line = &raw[y * (stride + 1) + 1];
    for (size_t i = 0; i < stride; ++i) {
      const int a = i >= static_cast<size_t>(channels) ? row[i - channels] : 0;
      const int b = prev[i];
      const int c = i >= static_cast<size_t>(channels) ? prev[i - channels] : 0;
      int predictor = 0;
      switch (filter) {
        case 0:
          predictor = 0;
          break;
        case 1:
          predictor = a;
          break;
        case 2:
          predictor = b;
          break;
        case 3:
          predictor = (a + b) / 2;
          break;
        case 4: {
          const int p = a + b - c, pa = std::abs(p - a), pb = std::abs(p - b), pc = std::abs(p - c);
          predictor = (pa <= pb && pa <= pc) ? a : (pb <= pc ? b : c);
          break;
        }
        default:
          return absl::InvalidArgumentError(
              absl::StrCat(path, ": row ", y, " has filter ", filter));
      }
      row[i] = static_cast<uint8_t>(line[i] + predictor);
    }
    for (int x = 0; x < image.width; ++x) {
      const uint8_t* p = &row[static_cast<size_t>(x) * channels];
      image.rgb.push_back({p[0], p[1], p[2]});
    }
    prev.swap(row);
  }
  return image;
}

}  // namespace splitq::testing
