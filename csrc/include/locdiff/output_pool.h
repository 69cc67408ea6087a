// A small cache of CPU output blocks, so that a call which returns a fresh output of a
// megabyte or more reuses the pages of an output the caller has since dropped.
//
// Why: a fresh output above glibc's mmap threshold is a new mapping whose pages are zeroed
// on first touch, and below it glibc gives its heap top back once enough is freed; at high
// degree either costs more than the harmonics. The pool keeps freed blocks (from 2 MiB,
// aligned and advised for huge pages) up to a byte limit and hands back the smallest that
// fits; peak memory is unchanged, set_limit(0) gives all back (docs/kernels.md, "Output memory").
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
