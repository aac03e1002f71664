// Threads of our own for the kernels, kept awake between calls.
//
// A decode step makes some 120 kernel calls of 10-300 µs each. Handed to XLA's thread pool,
// a call's helper thread woke up when the call was half done: the int8 products ran at 16-18
// GB/s where the machine reads 37. These workers wait for the next call by yielding the core
// for a while (a step's calls come every few microseconds) before they sleep.
#pragma once

#include <cstdint>
#include <functional>

namespace starcoder {

// Runs task(i) for every i in [0, tasks), on the calling thread and the workers; returns when
// all are done. A call made while another is running (XLA may run two at once) runs on its
// own thread alone.
void Parallel(int64_t tasks, const std::function<void(int64_t)>& task);

// How many threads Parallel shares tasks over: the calling thread and the workers.
int64_t Threads();

}  // namespace starcoder
