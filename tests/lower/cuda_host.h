// Host emulation of the CUDA C that TVM generates for moec's GEMVs (tests/lower/cuda_host.py): each CUDA
// thread of a block is a coroutine (ucontext) on one OS thread; __syncthreads waits for the block, warp
// shuffles for the warp (each lane publishes its value, all lanes read, all lanes pass a second barrier
// before the slots are reused); blocks run one after another, so __shared__ arrays are function statics.
// The scheduler runs the runnable threads in a chosen order (forward, reverse) until each blocks, so a
// read of shared memory that lacks its barrier sees another order's data; a barrier some threads never
// reach (divergence, an early exit) ends the launch with an error instead of hanging.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <ucontext.h>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define uint unsigned int
#define uchar unsigned char
#define ushort unsigned short

typedef _Float16 half;

struct dim3 { unsigned x, y, z; };
static dim3 threadIdx, blockIdx, blockDim, gridDim;

#define MOEC_VEC2(T, name) struct alignas(2 * sizeof(T)) name { T x, y; };
#define MOEC_VEC3(T, name) struct name { T x, y, z; };
#define MOEC_VEC4(T, name) struct alignas(4 * sizeof(T) > 16 ? 16 : 4 * sizeof(T)) name { T x, y, z, w; };
#define MOEC_VECS(T, p) MOEC_VEC2(T, p##2) MOEC_VEC3(T, p##3) MOEC_VEC4(T, p##4)
MOEC_VECS(float, float) MOEC_VECS(int, int) MOEC_VECS(unsigned int, uint) MOEC_VECS(signed char, char)
MOEC_VECS(unsigned char, uchar) MOEC_VECS(short, short) MOEC_VECS(unsigned short, ushort)
MOEC_VECS(long long, longlong) MOEC_VECS(unsigned long long, ulonglong)

static inline float max(float a, float b) { return a > b ? a : b; }
static inline float min(float a, float b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }
static inline int min(int a, int b) { return a < b ? a : b; }
static inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
static inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
static inline long max(long a, long b) { return a > b ? a : b; }
static inline long min(long a, long b) { return a < b ? a : b; }
static inline long long max(long long a, long long b) { return a > b ? a : b; }
static inline long long min(long long a, long long b) { return a < b ? a : b; }
#define __expf(a) expf(a)
static inline float __fdividef(float a, float b) { return a / b; }
static inline float rsqrtf(float a) { return 1.0f / sqrtf(a); }
static inline float __int_as_float(int a) { float f; memcpy(&f, &a, 4); return f; }
static inline int __float_as_int(float a) { int i; memcpy(&i, &a, 4); return i; }

static inline int __dp4a(int a, int b, int c) {
  for (int m = 0; m < 4; ++m) c += (int)(signed char)(a >> (8 * m)) * (int)(signed char)(b >> (8 * m));
  return c;
}
static inline unsigned __dp4a(unsigned a, unsigned b, unsigned c) {
  for (int m = 0; m < 4; ++m) c += ((a >> (8 * m)) & 255u) * ((b >> (8 * m)) & 255u);
  return c;
}

namespace moec_emu {
enum State { RUNNABLE, AT_BLOCK, AT_WARP, DONE };
struct Thread { ucontext_t ctx; std::vector<char> stack; dim3 tid; State state; };
static std::vector<Thread> threads;
static ucontext_t scheduler;
static int current;
static void (*body)();
static uint64_t slots[1024];  // one exchange slot a thread (warp shuffles)

static inline void wait(State s) {
  threads[current].state = s;
  swapcontext(&threads[current].ctx, &scheduler);
  threadIdx = threads[current].tid;
}
static void trampoline() {
  body();
  threads[current].state = DONE;
}
template <typename T> static inline T shuffle_from(T v, int src_lane) {
  int lane = current % 32, warp0 = current - lane;
  uint64_t s = 0;
  memcpy(&s, &v, sizeof(T));
  slots[current] = s;
  wait(AT_WARP);  // every lane has published
  T out;
  memcpy(&out, &slots[warp0 + src_lane], sizeof(T));
  wait(AT_WARP);  // every lane has read: the slots may be written again
  return out;
}

// Run one launch; 0 on success, 1 on a barrier some threads of the block or warp cannot reach.
static int run(void (*kernel)(), dim3 grid, dim3 block, int reverse) {
  int n = block.x * block.y * block.z;
  if (n > 1024) return 2;
  body = kernel;
  gridDim = grid;
  blockDim = block;
  threads.assign(n, Thread());
  for (auto& t : threads) t.stack.resize(1 << 16);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx = {bx, by, bz};
        for (int i = 0; i < n; ++i) {
          Thread& t = threads[i];
          t.tid = {(unsigned)(i % block.x), (unsigned)(i / block.x % block.y), (unsigned)(i / (block.x * block.y))};
          t.state = RUNNABLE;
          getcontext(&t.ctx);
          t.ctx.uc_stack.ss_sp = t.stack.data();
          t.ctx.uc_stack.ss_size = t.stack.size();
          t.ctx.uc_link = &scheduler;
          makecontext(&t.ctx, trampoline, 0);
        }
        for (;;) {
          for (int j = 0; j < n; ++j) {
            int i = reverse ? n - 1 - j : j;
            if (threads[i].state != RUNNABLE) continue;
            current = i;
            threadIdx = threads[i].tid;
            swapcontext(&scheduler, &threads[i].ctx);
          }
          int done = 0, at_block = 0;
          bool released = false;
          for (int w = 0; w < n; w += 32) {  // a warp whose lanes all wait at a shuffle passes it
            int lanes = n - w < 32 ? n - w : 32, at = 0;
            for (int l = 0; l < lanes; ++l) at += threads[w + l].state == AT_WARP;
            if (at == lanes) {
              for (int l = 0; l < lanes; ++l) threads[w + l].state = RUNNABLE;
              released = true;
            }
          }
          for (auto& t : threads) { done += t.state == DONE; at_block += t.state == AT_BLOCK; }
          if (done == n) break;
          if (at_block == n) {
            for (auto& t : threads) t.state = RUNNABLE;
            released = true;
          }
          if (!released) return 1;
        }
      }
  return 0;
}
}  // namespace moec_emu

static inline void __syncthreads() { moec_emu::wait(moec_emu::AT_BLOCK); }
static inline unsigned __activemask() { return 0xffffffffu; }
template <typename T> static inline T __shfl_sync(unsigned, T v, int src, int width = 32) {
  int lane = moec_emu::current % 32;
  return moec_emu::shuffle_from(v, lane / width * width + (src % width));
}
template <typename T> static inline T __shfl_down_sync(unsigned, T v, unsigned d, int width = 32) {
  int lane = moec_emu::current % 32, in = lane % width;
  return moec_emu::shuffle_from(v, in + (int)d < width ? lane + (int)d : lane);
}
template <typename T> static inline T __shfl_up_sync(unsigned, T v, unsigned d, int width = 32) {
  int lane = moec_emu::current % 32, in = lane % width;
  return moec_emu::shuffle_from(v, in >= (int)d ? lane - (int)d : lane);
}
template <typename T> static inline T __shfl_xor_sync(unsigned, T v, int m, int width = 32) {
  int lane = moec_emu::current % 32;
  return moec_emu::shuffle_from(v, lane / width * width + ((lane % width) ^ m) % width);
}
