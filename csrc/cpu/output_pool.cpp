// The output block cache (locdiff/output_pool.h).
#include "locdiff/output_pool.h"

#include <cstdint>
#include <cstdlib>
#include <deque>
#include <iterator>
#include <mutex>
#include <new>

#if defined(__linux__)
#include <pthread.h>
#include <sys/mman.h>
#endif

namespace locdiff::output_pool {
namespace {

constexpr size_t kHuge = size_t(1) << 21;  // 2 MiB: blocks are whole huge pages

struct Block {
  void* data;
  size_t capacity;
};

struct Cache {
  std::mutex mutex;
  std::deque<Block> blocks;  // oldest first
  size_t bytes = 0;
  size_t limit = size_t(1) << 30;
};

Cache& cache();

#if defined(__linux__)
// A child forked while another thread held the lock (a data loader forking its workers)
// would find it locked forever; the child has one thread, so it gets a fresh lock.
void reset_lock_in_child() { new (&cache().mutex) std::mutex(); }
#endif

Cache& cache() {
  static Cache* c = [] {
#if defined(__linux__)
    // (A fork in the instant between this and the assignment of c is not covered.)
    pthread_atfork(nullptr, nullptr, reset_lock_in_child);
#endif
    return new Cache;  // never destroyed: blocks may return during interpreter exit
  }();
  return *c;
}

constexpr size_t kPage = size_t(1) << 12;  // blocks under a huge page: whole 4 KiB pages

// Blocks of a huge page or more are whole huge pages; smaller ones whole pages, so that an
// output of a few hundred KB does not hold 2 MiB.
size_t round_up(size_t bytes) {
  const size_t unit = bytes >= kHuge ? kHuge : kPage;
  return (bytes + unit - 1) / unit * unit;
}

void* map_block(size_t capacity) {
#if defined(__linux__)
  if (capacity < kHuge) {  // page aligned is enough: no huge page to line up with
    void* p = mmap(nullptr, capacity, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    return p;
  }
  // Map one huge page more than asked, then cut the unaligned head and tail, so that every
  // 2 MiB of the block can be a transparent huge page.
  const size_t span = capacity + kHuge;
  void* raw = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) throw std::bad_alloc();
  const uintptr_t begin = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = (begin + kHuge - 1) & ~(kHuge - 1);
  if (aligned > begin) munmap(raw, aligned - begin);
  const uintptr_t tail = aligned + capacity, end = begin + span;
  if (end > tail) munmap(reinterpret_cast<void*>(tail), end - tail);
#if defined(MADV_HUGEPAGE)
  madvise(reinterpret_cast<void*>(aligned), capacity, MADV_HUGEPAGE);  // advisory
#endif
  return reinterpret_cast<void*>(aligned);
#else
  void* p = std::aligned_alloc(capacity < kHuge ? kPage : kHuge, capacity);
  if (!p) throw std::bad_alloc();
  return p;
#endif
}

void unmap_block(const Block& b) {
#if defined(__linux__)
  munmap(b.data, b.capacity);
#else
  std::free(b.data);
#endif
}

// Unmaps the oldest blocks until the cache holds at most its limit; call with the lock
// held, returns the blocks to unmap after unlocking.
std::deque<Block> over_limit(Cache& c) {
  std::deque<Block> out;
  while (c.bytes > c.limit && !c.blocks.empty()) {
    out.push_back(c.blocks.front());
    c.bytes -= c.blocks.front().capacity;
    c.blocks.pop_front();
  }
  return out;
}

}  // namespace

void* acquire(size_t bytes, size_t* capacity) {
  const size_t want = round_up(bytes == 0 ? 1 : bytes);
  Cache& c = cache();
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    // The smallest cached block that fits, but not one more than twice the size; among equals
    // the newest, whose lines are the likeliest still in cache (docs/kernels.md, "Output memory").
    auto best = c.blocks.rend();
    for (auto it = c.blocks.rbegin(); it != c.blocks.rend(); ++it)
      if (it->capacity >= want && it->capacity <= 2 * want && (best == c.blocks.rend() || it->capacity < best->capacity))
        best = it;
    if (best != c.blocks.rend()) {
      const Block b = *best;
      c.blocks.erase(std::next(best).base());
      c.bytes -= b.capacity;
      *capacity = b.capacity;
      return b.data;
    }
  }
  *capacity = want;
  return map_block(want);
}

void release(void* data, size_t capacity) {
  Cache& c = cache();
  std::deque<Block> drop;
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    c.blocks.push_back({data, capacity});
    c.bytes += capacity;
    drop = over_limit(c);
  }
  for (const Block& b : drop) unmap_block(b);
}

void set_limit(size_t bytes) {
  Cache& c = cache();
  std::deque<Block> drop;
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    c.limit = bytes;
    drop = over_limit(c);
  }
  for (const Block& b : drop) unmap_block(b);
}

size_t limit() {
  std::lock_guard<std::mutex> lock(cache().mutex);
  return cache().limit;
}

size_t cached() {
  std::lock_guard<std::mutex> lock(cache().mutex);
  return cache().bytes;
}

}  // namespace locdiff::output_pool
