// base/memory.h: MemoryTrimmer gives back memory freed after a trim that ran while it was still
// in use (the peak of a flood), within one `every`.
#include "base/memory.h"

#include <gtest/gtest.h>
#include <malloc.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace splitq::base {
namespace {

TEST(MemoryTrimmer, GivesBackWhatAFloodFreedAfterATrimAtItsPeak) {
  // As `splitq` runs: glibc keeps freed heap memory (no automatic trim at the top).
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
  mallopt(M_MMAP_THRESHOLD, 1 << 30);
  malloc_trim(0);
  MemoryTrimmer::Options options;
  options.every = std::chrono::seconds(0);
  options.at_least = std::chrono::hours(1);
  MemoryTrimmer trimmer(options);
  const double rss0 = RssMiB();

  // A flood: 256 MiB in small blocks, in use when the trimmer looks.
  std::vector<char*> blocks;
  for (int i = 0; i < 256 * 256; ++i) {
    blocks.push_back(static_cast<char*>(std::malloc(4000)));
    std::memset(blocks.back(), 1, 4000);
  }
  EXPECT_GT(RssMiB(), rss0 + 200);
  EXPECT_TRUE(trimmer.Tick());  // over the low mark: it trims, and frees nothing
  EXPECT_GT(RssMiB(), rss0 + 200);

  // The flood ends: freed, but glibc keeps it, so the RSS does not fall by itself.
  for (char* b : blocks) std::free(b);
  const double kept = RssMiB();
  EXPECT_GT(kept, rss0 + 200);
  EXPECT_TRUE(trimmer.Tick());  // still over the low mark (not over the RSS after the last trim)
  const double after = RssMiB();
  std::printf("RSS %.0f MiB, %.0f in the flood and after it, %.0f after the next tick\n", rss0,
              kept, after);
  EXPECT_LT(after, rss0 + 64);
  EXPECT_FALSE(trimmer.Tick());  // back under the mark: nothing to do
}

}  // namespace
}  // namespace splitq::base
