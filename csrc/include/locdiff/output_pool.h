// A small cache of CPU output blocks, so that a call which returns a fresh output of a
// megabyte or more reuses the pages of an output the caller has since dropped.
//
// Why: above glibc's mmap threshold (at most 32 MB) every fresh array is a new mapping, and
// the kernel zeroes each of its pages on first touch. At high degree that costs more than
// the harmonics (L = 256, float64, AMD EPYC VM: 0.80 ns per value into a fresh output, 0.31
// into a reused one). Below it, glibc gives the top of its heap back to the OS when enough
// is freed there, so a loop that holds two outputs of 1-2 MB at a time faulted in every page
// of each (float64 L = 16, 1024 points: 560 faults and 0.56 ms a call, against 0.07 with
// none). torch's CPU allocator caches nothing; this pool keeps freed blocks (from 2 MiB,
// 2 MiB aligned and advised for transparent huge pages), up to a byte limit, and hands back
// the smallest cached block that fits (the last released among equals: the likeliest to be
// still in cache). Peak memory is unchanged (a cached block was live before it was freed);
// what the cache holds is given back by set_limit(0).
#pragma once

#include <cstddef>

namespace locdiff::output_pool {

// Memory of at least `bytes` (> 0), 2 MiB aligned from 2 MiB, page aligned below: a cached
// block or a new mapping.
// Throws std::bad_alloc when the OS refuses. `capacity` receives the block's size.
void* acquire(size_t bytes, size_t* capacity);
// Returns a block from acquire() to the cache (unmapped when the cache would exceed its
// limit: the oldest blocks leave first).
void release(void* data, size_t capacity);
// The cache's byte limit (1 GiB until the Python layer sets its default, locdiff.ops.
// output_pool); lowering it unmaps blocks until it holds.
void set_limit(size_t bytes);
size_t limit();
// Bytes cached now (blocks not in use).
size_t cached();

}  // namespace locdiff::output_pool
