// The CPU emulator's runtime: fibers for CUDA threads, a deterministic scheduler, exact
// warp collectives (shuffles, votes, ldmatrix, mma.sync), cp.async with delayed landing, and
// the checkers (shared-memory races, uninitialised shared reads, shared and global bounds,
// collective and barrier agreement). Compiled without instrumentation; the kernel code is
// compiled with -fsanitize=thread and its memory accesses arrive at the __tsan_* hooks at
// the end of this file. See runtime.h for the model and docs/NOTES.md for the design.
#include "emu/runtime.h"

// The storage types (and the vector types they use) of emulated kernels.
#include "emu/cuda_emu.h"
#include "emu/cuda_bf16.h"

#include <link.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace longctx_emu {
namespace {

constexpr int kWarp = 32;
constexpr size_t kStackBytes = 256 * 1024;      // per fiber (mapped lazily by the OS)
constexpr size_t kArenaBytes = 512 * 1024;      // dynamic + static shared memory + red zones
constexpr size_t kRedZone = 256;                // unallocated bytes after every allocation
constexpr uint32_t kMaxThreads = 1024;

// ---------------------------------------------------------------------------------------
// Context switching. x86-64: six callee-saved registers on the stack and a stack-pointer
// swap. Elsewhere: ucontext.

#if defined(__x86_64__)
extern "C" void longctx_emu_switch(void** save_sp, void* new_sp);
asm(R"(
.text
.p2align 4
.type longctx_emu_switch,@function
longctx_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
.size longctx_emu_switch, .-longctx_emu_switch
)");
#endif

enum class State : uint8_t { Runnable, AtBarrier, AtCluster, AtWarp, Exited };

enum class CollKind : uint8_t { Shfl, Vote, Syncwarp, Ldmatrix, Mma };

// What a lane waiting at a warp collective brought and where its result goes (pointers into
// the lane's own stack, alive while it waits).
struct Coll {
    CollKind kind;
    const char* file;
    int line;
    unsigned mask;
    int mode;  // shuffle or vote mode, mma kind, ldmatrix count
    bool trans;
    int bytes, c, width;
    uint64_t value;
    uint64_t result;
    uint32_t addr;
    uint32_t* regs;
    float* d;
    const uint32_t* a;
    uint32_t b0, b1;
};

struct CpCopy {
    uint32_t dst;
    const void* src;
    bool valid;
};

struct Fiber {
    void* sp = nullptr;
#if !defined(__x86_64__)
    ucontext_t uc;
#endif
    char* stack_lo = nullptr;
    char* stack_hi = nullptr;
    State state = State::Runnable;
    Dim3 tid{0, 0, 0};
    int linear = 0;  // within the CTA
    int cta = 0;     // rank in the cluster
    int gid = 0;     // cta * threads per CTA + linear: the fiber's index in the launch
    // The cluster barrier: arrivals and completed waits so far (phase k is complete once
    // every thread of the cluster has arrived k + 1 times).
    uint32_t arrives = 0;
    uint32_t waits = 0;
    const char* site_file = "kernel entry";  // last barrier or collective passed
    int site_line = 0;
    Coll coll{};
    std::vector<CpCopy> open_group;
    std::vector<std::vector<CpCopy>> groups;  // committed, oldest first
};

// Per-byte shadow of shared memory. Thread ids are launch-wide fiber indices (`gid`). The
// last write records the writer's CTA barrier epoch, warp epoch and cluster-barrier arrivals
// (`w_cep`); reads by the arena's own CTA are tracked as before clusters existed (plus the
// most arrivals among the readers, `r_cep`), and reads by other CTAs of the cluster
// (distributed shared memory) separately (`rr_cep`). An access made after a thread's k-th
// arrival is ordered before another thread's access only once that thread has completed
// k + 1 waits.
enum : uint8_t { kAlloc = 1, kWritten = 2, kPending = 4, kAtomic = 8 };
struct Shadow {
    uint32_t w_bar, w_wep, w_cep;
    uint32_t r_bar, r_wep, r_cep;
    uint32_t rr_cep;  // cluster epoch of the last remote read
    int16_t w_tid;    // -1: none
    int16_t r_tid;    // -1: none, -2: several threads (of the arena's CTA)
    int16_t r_warp;   // -1: none, -2: several warps
    int16_t rr_tid;   // remote reader: -1 none, -2 several
    uint8_t flags;
    uint8_t pad[3];
};

struct Segment {
    uintptr_t lo, hi;
};

// Fiber stacks and shared-memory arenas with their shadows (one per CTA of a cluster),
// reused by later launches (of any OS thread: a pool is taken for a launch and given back
// after it).
struct Pool {
    std::vector<char*> stacks;
    std::vector<char*> arenas;
    std::vector<Shadow*> shadows;
};

// One CTA of the running cluster: its shared memory and barrier state.
struct Cta {
    Dim3 bid{0, 0, 0};
    char* arena = nullptr;
    Shadow* shadow = nullptr;
    size_t used_hi = 0;  // bytes of arena in use (for the per-CTA reset)
    std::map<const void*, std::pair<size_t, size_t>> statics;  // key -> (offset, bytes)
    uint32_t bar_epoch = 1;
    std::vector<uint32_t> warp_epoch;
    uint32_t at_barrier = 0;
    uint32_t exited = 0;
};

struct Launch {
    const LongctxEmuLaunch* desc = nullptr;
    Pool* pool = nullptr;
    std::vector<LongctxEmuBuffer> buffers;  // sorted by base
    Dim3 block{0, 0, 0};
    uint32_t nthreads = 0;
    uint32_t nwarps = 0;
    Dim3 cluster{1, 1, 1};
    uint32_t csize = 1;  // CTAs per cluster, run together
    std::vector<Cta> ctas;
    std::vector<Fiber> fibers;  // csize * nthreads, CTA by CTA
    int cur = -1;
    void* sched_sp = nullptr;
#if !defined(__x86_64__)
    ucontext_t sched_uc;
#endif
    size_t dyn = 0;
    // The cluster barrier: the site of each phase's first arrival.
    std::vector<std::pair<const char*, int>> phase_site;
    uint32_t exited_all = 0;
    // The first error ends the launch.
    bool failed = false;
    std::string error;
};

thread_local Launch* t_launch = nullptr;

std::mutex g_pool_lock;
std::vector<Pool*> g_pools;

std::vector<Segment>& image_segments() {
    static std::vector<Segment> segs = [] {
        std::vector<Segment> v;
        dl_iterate_phdr(
            [](struct dl_phdr_info* info, size_t, void* data) {
                auto* out = static_cast<std::vector<Segment>*>(data);
                for (int i = 0; i < info->dlpi_phnum; ++i) {
                    const auto& ph = info->dlpi_phdr[i];
                    if (ph.p_type != PT_LOAD) continue;
                    const uintptr_t lo = info->dlpi_addr + ph.p_vaddr;
                    out->push_back(Segment{lo, lo + ph.p_memsz});
                }
                return 0;
            },
            &v);
        return v;
    }();
    return segs;
}

Fiber& cur() { return t_launch->fibers[size_t(t_launch->cur)]; }
Cta& cur_cta() { return t_launch->ctas[size_t(cur().cta)]; }

std::string fmt(const char* f, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, f);
    vsnprintf(buf, sizeof buf, f, ap);
    va_end(ap);
    return buf;
}

std::string where(const Fiber& f) {
    const Launch& L = *t_launch;
    const Dim3 b = L.ctas[size_t(f.cta)].bid;
    return fmt("kernel %s, block (%u,%u,%u), thread (%u,%u,%u) [warp %d lane %d, last sync %s:%d]", L.desc->kernel,
               b.x, b.y, b.z, f.tid.x, f.tid.y, f.tid.z, f.linear / kWarp, f.linear % kWarp, f.site_file,
               f.site_line);
}

// A fiber by launch-wide index; names its block too when the launch has clusters.
std::string thread_name(int gid) {
    const Launch& L = *t_launch;
    const Fiber& f = L.fibers[size_t(gid)];
    if (L.csize == 1) return fmt("thread (%u,%u,%u)", f.tid.x, f.tid.y, f.tid.z);
    const Dim3 b = L.ctas[size_t(f.cta)].bid;
    return fmt("thread (%u,%u,%u) of block (%u,%u,%u)", f.tid.x, f.tid.y, f.tid.z, b.x, b.y, b.z);
}

void switch_to_scheduler();

// Records the first error and leaves the failing fiber for good.
[[noreturn]] void fail(const std::string& what) {
    Launch& L = *t_launch;
    if (!L.failed) {
        L.failed = true;
        L.error = where(cur()) + ": " + what;
    }
    cur().state = State::Exited;
    switch_to_scheduler();
    __builtin_unreachable();
}

// Error raised by the scheduler (not on behalf of the running fiber).
void fail_sched(const std::string& what) {
    Launch& L = *t_launch;
    if (!L.failed) {
        L.failed = true;
        const Dim3 b = L.ctas[0].bid;
        L.error = fmt("kernel %s, block (%u,%u,%u)%s: ", L.desc->kernel, b.x, b.y, b.z,
                      L.csize > 1 ? " (first of its cluster)" : "") +
                  what;
    }
}

// ---------------------------------------------------------------------------------------
// Fibers.

void fiber_main();

void fiber_init(Fiber& f, char* stack) {
    f.stack_lo = stack;
    f.stack_hi = stack + kStackBytes;
#if defined(__x86_64__)
    auto* top = reinterpret_cast<uintptr_t*>(reinterpret_cast<uintptr_t>(f.stack_hi) & ~uintptr_t(15));
    *--top = 0;                                         // fake return address of fiber_main
    *--top = reinterpret_cast<uintptr_t>(&fiber_main);  // popped by `ret`
    for (int i = 0; i < 6; ++i) *--top = 0;             // rbp rbx r12 r13 r14 r15
    f.sp = top;
#else
    getcontext(&f.uc);
    f.uc.uc_stack.ss_sp = stack;
    f.uc.uc_stack.ss_size = kStackBytes;
    f.uc.uc_link = nullptr;
    makecontext(&f.uc, fiber_main, 0);
#endif
}

void switch_to_scheduler() {
    Launch& L = *t_launch;
    Fiber& f = cur();
#if defined(__x86_64__)
    longctx_emu_switch(&f.sp, L.sched_sp);
#else
    swapcontext(&f.uc, &L.sched_uc);
#endif
}

void run_fiber(int i) {
    Launch& L = *t_launch;
    L.cur = i;
    Fiber& f = L.fibers[size_t(i)];
#if defined(__x86_64__)
    longctx_emu_switch(&L.sched_sp, f.sp);
#else
    swapcontext(&L.sched_uc, &f.uc);
#endif
    L.cur = -1;
}

void on_exit_thread();

void fiber_main() {
    Launch& L = *t_launch;
    L.desc->tramp(L.desc->entry, L.desc->params);
    on_exit_thread();
    cur().state = State::Exited;
    switch_to_scheduler();
    __builtin_unreachable();
}

// ---------------------------------------------------------------------------------------
// Shared memory checks.

// Whether an access by `other` (launch-wide id, with the epochs it recorded) happens before
// the running fiber's: a cluster barrier since (the other thread arrived after the access
// and this one has waited for that phase), or within a CTA a barrier since, or a warp
// collective since within the warp.
bool synced_with(int other, uint32_t o_bar, uint32_t o_wep, uint32_t o_arr, const Fiber& me) {
    const Launch& L = *t_launch;
    if (me.waits > o_arr) return true;
    if (int(uint32_t(other) / L.nthreads) != me.cta) return false;
    const Cta& C = L.ctas[size_t(me.cta)];
    if (o_bar < C.bar_epoch) return true;
    const int w = me.linear / kWarp;
    return int(uint32_t(other) % L.nthreads) / kWarp == w && o_wep < C.warp_epoch[size_t(w)];
}

// An access by the running fiber to bytes [off, off + n) of the shared memory of CTA
// `owner` of the cluster (its own, or another's through distributed shared memory).
void shared_access(int owner, size_t off, size_t n, bool write, bool atomic) {
    Launch& L = *t_launch;
    Fiber& me = cur();
    Cta& A = L.ctas[size_t(owner)];
    const Cta& C = L.ctas[size_t(me.cta)];
    const bool remote = owner != me.cta;
    const int tid = me.gid;
    const int warp = me.linear / kWarp;
    const uint32_t wep = C.warp_epoch[size_t(warp)];
    const char* whose = remote ? " of another CTA of the cluster" : "";
    if (remote && A.exited == L.nthreads) {
        fail(fmt("%s of %zu bytes at shared offset %zu of a CTA of the cluster that has exited", write ? "write" : "read",
                 n, off));
    }
    for (size_t i = off; i < off + n; ++i) {
        Shadow& s = A.shadow[i];
        if (!(s.flags & kAlloc)) {
            fail(fmt("%s of %zu bytes at shared offset %zu%s is outside every shared allocation (dynamic shared "
                     "memory is %zu bytes)",
                     write ? "write" : "read", n, off, whose, L.dyn));
        }
        if (s.flags & kPending) {
            fail(fmt("%s of %zu bytes at shared offset %zu%s touches the destination of a cp.async that no "
                     "cp.async.wait_group has covered yet",
                     write ? "write" : "read", n, off, whose));
        }
        if (!write && !(s.flags & kWritten)) {
            fail(fmt("read of %zu bytes at shared offset %zu%s: byte %zu was never written in this block", n, off,
                     whose, i));
        }
        if (s.w_tid >= 0 && s.w_tid != tid && !(atomic && (s.flags & kAtomic)) &&
            !synced_with(s.w_tid, s.w_bar, s.w_wep, s.w_cep, me)) {
            fail(fmt("shared-memory race: %s of %zu bytes at shared offset %zu%s after %s wrote byte %zu with no "
                     "barrier (or __syncwarp within the warp, or cluster barrier across CTAs) between them",
                     write ? "write" : "read", n, off, whose, thread_name(s.w_tid).c_str(), i));
        }
        if (write) {
            if (s.r_tid != -1 && s.r_tid != tid) {
                const bool ok = me.waits > s.r_cep ||
                                (!remote && (s.r_bar != C.bar_epoch || (s.r_warp == warp && s.r_wep < wep)));
                if (!ok) {
                    fail(fmt("shared-memory race: write of %zu bytes at shared offset %zu%s after %s read byte %zu "
                             "with no barrier (or __syncwarp within the warp, or cluster barrier across CTAs) "
                             "between them",
                             n, off, whose, s.r_tid >= 0 ? thread_name(s.r_tid).c_str() : "other threads", i));
                }
            }
            if (s.rr_tid != -1 && s.rr_tid != tid && me.waits <= s.rr_cep) {
                fail(fmt("shared-memory race: write of %zu bytes at shared offset %zu%s after %s of another CTA read "
                         "byte %zu with no cluster barrier between them",
                         n, off, whose, s.rr_tid >= 0 ? thread_name(s.rr_tid).c_str() : "threads", i));
            }
            s.w_tid = int16_t(tid);
            s.w_bar = C.bar_epoch;
            s.w_wep = wep;
            s.w_cep = me.arrives;
            s.r_tid = -1;
            s.r_warp = -1;
            s.r_cep = 0;
            s.rr_tid = -1;
            s.rr_cep = 0;
            s.flags = uint8_t((s.flags | kWritten) & ~kAtomic) | (atomic ? kAtomic : 0);
        } else if (remote) {
            if (s.rr_tid == -1) {
                s.rr_tid = int16_t(tid);
            } else if (s.rr_tid != tid) {
                s.rr_tid = -2;
            }
            s.rr_cep = std::max(s.rr_cep, me.arrives);
        } else {
            const bool stale = s.r_tid == -1 || s.r_bar != C.bar_epoch || (s.r_warp == warp && s.r_wep < wep);
            if (stale) {
                s.r_tid = int16_t(tid);
                s.r_warp = int16_t(warp);
                s.r_bar = C.bar_epoch;
                s.r_wep = wep;
            } else {
                if (s.r_tid != tid) s.r_tid = -2;
                if (s.r_warp != warp) s.r_warp = -2;
                s.r_wep = std::max(s.r_wep, wep);
            }
            // Never lowered by a new CTA epoch: a reader of another phase may still be
            // unordered with a writer of another CTA.
            s.r_cep = std::max(s.r_cep, me.arrives);
        }
    }
}

const LongctxEmuBuffer* find_buffer(uintptr_t a) {
    const auto& b = t_launch->buffers;
    auto it = std::upper_bound(b.begin(), b.end(), a,
                               [](uintptr_t x, const LongctxEmuBuffer& buf) { return x < buf.base; });
    if (it == b.begin()) return nullptr;
    --it;
    if (a < it->base + it->bytes) return &*it;
    return nullptr;
}

// Every load and store of kernel code lands here.
void access(const void* p, size_t n, bool write, bool atomic = false) {
    Launch* L = t_launch;
    if (L == nullptr || L->cur < 0) return;
    const Fiber& f = L->fibers[size_t(L->cur)];
    const char* c = static_cast<const char*>(p);
    if (c >= f.stack_lo && c < f.stack_hi) return;  // the thread's own registers and locals
    for (uint32_t r = 0; r < L->csize; ++r) {
        const char* arena = L->ctas[r].arena;
        if (c >= arena && c < arena + kArenaBytes) {
            const size_t off = size_t(c - arena);
            if (off + n > kArenaBytes) fail(fmt("shared access of %zu bytes at offset %zu leaves the arena", n, off));
            shared_access(int(r), off, n, write, atomic);
            return;
        }
    }
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    if (const LongctxEmuBuffer* b = find_buffer(a)) {
        if (a + n > b->base + b->bytes) {
            fail(fmt("global %s of %zu bytes at %#lx runs past the end of buffer %s (%lu bytes, access at byte "
                     "%lu)",
                     write ? "write" : "read", n, (unsigned long)a, b->name, (unsigned long)b->bytes,
                     (unsigned long)(a - b->base)));
        }
        if (write && !b->writable) {
            fail(fmt("global write of %zu bytes into read-only buffer %s at byte %lu", n, b->name,
                     (unsigned long)(a - b->base)));
        }
        return;
    }
    if (!write) {
        for (const Segment& s : image_segments())
            if (a >= s.lo && a + n <= s.hi) return;  // constant tables of the program image
    }
    fail(fmt("global %s of %zu bytes at %#lx is outside every buffer of the launch", write ? "write" : "read", n,
             (unsigned long)a));
}

// ---------------------------------------------------------------------------------------
// Barriers and warp collectives.

unsigned warp_lanes(int warp) {
    const Launch& L = *t_launch;
    const uint32_t first = uint32_t(warp) * kWarp;
    const uint32_t n = std::min<uint32_t>(kWarp, L.nthreads - first);
    return n == 32 ? 0xffffffffu : ((1u << n) - 1u);
}

void block_until_runnable() {
    while (cur().state != State::Runnable) switch_to_scheduler();
}

void try_complete_barrier(Cta& C);

// The fiber of lane `lane` of warp `warp` of the running fiber's CTA.
Fiber& lane_fiber(int warp, int lane) {
    return t_launch->fibers[size_t(cur().cta) * t_launch->nthreads + size_t(warp * kWarp + lane)];
}

void on_exit_thread() {
    Launch& L = *t_launch;
    Fiber& me = cur();
    Cta& C = cur_cta();
    ++C.exited;
    ++L.exited_all;
    const int warp = me.linear / kWarp;
    const unsigned bit = 1u << (me.linear % kWarp);
    for (int l = 0; l < kWarp; ++l) {
        const uint32_t t = uint32_t(warp * kWarp + l);
        if (t >= L.nthreads) break;
        const Fiber& o = lane_fiber(warp, l);
        if (o.state == State::AtWarp && (o.coll.mask & bit)) {
            fail(fmt("exits while lane %d waits for it at a warp collective (%s:%d, mask %#x)", l, o.coll.file,
                     o.coll.line, o.coll.mask));
        }
    }
    if (C.at_barrier > 0 && C.at_barrier + C.exited == L.nthreads) {
        fail(fmt("exits before the barrier that %u other threads wait at", C.at_barrier));
    }
    for (const Fiber& o : L.fibers) {
        if (o.state == State::AtCluster && me.arrives <= o.waits) {
            fail(fmt("exits while %s waits at a cluster barrier (%s:%d) this thread has not arrived at",
                     thread_name(o.gid).c_str(), o.site_file, o.site_line));
        }
    }
}

void complete_warp_sync(int warp, unsigned mask) {
    if (mask == warp_lanes(warp)) ++cur_cta().warp_epoch[size_t(warp)];
}

void compute_collective(int warp, unsigned mask);

// Blocks the calling lane at warp collective `c`; returns once every lane of the mask has
// arrived and the results are in.
void arrive_warp(const Coll& c) {
    Fiber& me = cur();
    const int lane = me.linear % kWarp;
    const int warp = me.linear / kWarp;
    if (!(c.mask & (1u << lane))) {
        fail(fmt("warp collective at %s:%d with mask %#x that does not include the calling lane %d", c.file, c.line,
                 c.mask, lane));
    }
    if (c.mask & ~warp_lanes(warp)) {
        fail(fmt("warp collective at %s:%d names lanes (mask %#x) that do not exist in this warp", c.file, c.line,
                 c.mask));
    }
    me.coll = c;
    me.state = State::AtWarp;
    bool all = true;
    for (int l = 0; l < kWarp; ++l) {
        if (!(c.mask & (1u << l))) continue;
        const Fiber& o = lane_fiber(warp, l);
        if (o.state == State::Exited) {
            fail(fmt("warp collective at %s:%d (mask %#x) waits for lane %d, which has exited", c.file, c.line,
                     c.mask, l));
        }
        if (o.state == State::AtBarrier || o.state == State::AtCluster) {
            fail(fmt("lanes disagree: this lane is at a warp collective (%s:%d) while lane %d of its mask waits at "
                     "a barrier (%s:%d)",
                     c.file, c.line, l, o.site_file, o.site_line));
        }
        if (o.state == State::AtWarp) {
            if (o.coll.kind != c.kind || o.coll.mask != c.mask || o.coll.line != c.line ||
                strcmp(o.coll.file, c.file) != 0 || o.coll.mode != c.mode || o.coll.trans != c.trans) {
                fail(fmt("lanes disagree at a warp collective: lane %d is at %s:%d (mask %#x), lane %d at %s:%d "
                         "(mask %#x)",
                         lane, c.file, c.line, c.mask, l, o.coll.file, o.coll.line, o.coll.mask));
            }
        } else {
            all = false;
        }
    }
    if (all) {
        compute_collective(warp, c.mask);
        for (int l = 0; l < kWarp; ++l) {
            if (!(c.mask & (1u << l))) continue;
            Fiber& o = lane_fiber(warp, l);
            o.state = State::Runnable;
            o.site_file = c.file;
            o.site_line = c.line;
        }
        complete_warp_sync(warp, c.mask);
        // The lane that completed the collective yields too, so that threads after it in
        // the pass run up to their next synchronisation before this warp goes on: reads
        // that need a barrier then see other warps' writes, and the race checker fires.
        switch_to_scheduler();
    }
    block_until_runnable();
}

uint16_t smem_u16(uint32_t addr, int reader_lane_linear) {
    (void)reader_lane_linear;
    uint16_t v;
    memcpy(&v, cur_cta().arena + addr, 2);
    return v;
}

// An mma input element as f32 (exact for both types).
float mma_in(uint16_t bits, int kind) {
    if (kind == kMmaBf16) return __bfloat162float(__nv_bfloat16{bits});
    return __half2float(__half{bits});
}

void compute_collective(int warp, unsigned mask) {
    Launch& L = *t_launch;
    const int caller = L.cur;  // the lane that arrived last; errors name the lane at fault
    const int base = cur().cta * int(L.nthreads);
    const Coll& c0 = lane_fiber(warp, __builtin_ctz(mask)).coll;
    switch (c0.kind) {
        case CollKind::Syncwarp:
            break;
        case CollKind::Vote: {
            if (c0.mode == kVoteMatchAny) {
                for (int l = 0; l < kWarp; ++l) {
                    if (!((mask >> l) & 1u)) continue;
                    Coll& c = lane_fiber(warp, l).coll;
                    unsigned same = 0;
                    for (int o = 0; o < kWarp; ++o)
                        if ((mask >> o) & 1u && lane_fiber(warp, o).coll.value == c.value) same |= 1u << o;
                    c.result = same;
                }
                break;
            }
            unsigned ballot = 0;
            for (int l = 0; l < kWarp; ++l)
                if ((mask >> l) & 1u && lane_fiber(warp, l).coll.value) ballot |= 1u << l;
            for (int l = 0; l < kWarp; ++l) {
                if (!((mask >> l) & 1u)) continue;
                Coll& c = lane_fiber(warp, l).coll;
                c.result = c.mode == kVoteBallot ? ballot
                         : c.mode == kVoteAny    ? (ballot != 0)
                                                 : (ballot == mask);
            }
            break;
        }
        case CollKind::Shfl: {
            for (int l = 0; l < kWarp; ++l) {
                if (!((mask >> l) & 1u)) continue;
                Fiber& f = lane_fiber(warp, l);
                Coll& c = f.coll;
                const int w = c.width;
                const int seg = (l / w) * w;
                int src = l;
                switch (c.mode) {
                    case kShflIdx: src = seg + (c.c % w + w) % w; break;
                    case kShflUp: src = l - c.c >= seg ? l - c.c : l; break;
                    case kShflDown: src = l + c.c < seg + w ? l + c.c : l; break;
                    default: src = (l ^ c.c) < seg + w ? (l ^ c.c) : l; break;
                }
                if (src < 0 || src >= kWarp || !((mask >> src) & 1u)) {
                    L.cur = base + warp * kWarp + l;
                    fail(fmt("shuffle at %s:%d reads lane %d, which is not in the mask %#x (its value is undefined)",
                             c.file, c.line, src, mask));
                }
                c.result = lane_fiber(warp, src).coll.value;
            }
            break;
        }
        case CollKind::Ldmatrix: {
            // Lanes 8i..8i+7 address the rows of matrix i (count matrices).
            const int count = c0.mode;
            uint32_t rows[32];
            for (int l = 0; l < 8 * count; ++l) {
                Fiber& f = lane_fiber(warp, l);
                const uint32_t a = f.coll.addr;
                if (a % 16 != 0) {
                    L.cur = base + warp * kWarp + l;
                    fail(fmt("ldmatrix at %s:%d: row address %#x of lane %d is not 16-byte aligned", c0.file,
                             c0.line, a, l));
                }
                if (size_t(a) + 16 > kArenaBytes) {
                    L.cur = base + warp * kWarp + l;
                    fail(fmt("ldmatrix at %s:%d: row address %#x leaves shared memory", c0.file, c0.line, a));
                }
                L.cur = base + warp * kWarp + l;
                shared_access(cur().cta, a, 16, false, false);
                rows[l] = a;
            }
            L.cur = caller;
            for (int l = 0; l < kWarp; ++l) {
                Coll& c = lane_fiber(warp, l).coll;
                for (int i = 0; i < count; ++i) {
                    uint16_t lo, hi;
                    if (!c.trans) {
                        const uint32_t row = rows[8 * i + l / 4];
                        lo = smem_u16(row + 2 * (2 * (l % 4)), l);
                        hi = smem_u16(row + 2 * (2 * (l % 4) + 1), l);
                    } else {
                        lo = smem_u16(rows[8 * i + 2 * (l % 4)] + 2 * (l / 4), l);
                        hi = smem_u16(rows[8 * i + 2 * (l % 4) + 1] + 2 * (l / 4), l);
                    }
                    c.regs[i] = uint32_t(lo) | (uint32_t(hi) << 16);
                }
            }
            break;
        }
        case CollKind::Mma: {
            // PTX ISA, mma.m16n8k16 fragments; g = lane / 4, t = lane % 4.
            float A[16][16], B[16][8], C[16][8];
            const int kind = c0.mode;
            for (int l = 0; l < kWarp; ++l) {
                const Coll& c = lane_fiber(warp, l).coll;
                const int g = l / 4, t = l % 4;
                const int arow[4] = {g, g + 8, g, g + 8};
                const int acol[4] = {2 * t, 2 * t, 2 * t + 8, 2 * t + 8};
                for (int r = 0; r < 4; ++r) {
                    A[arow[r]][acol[r]] = mma_in(uint16_t(c.a[r] & 0xffffu), kind);
                    A[arow[r]][acol[r] + 1] = mma_in(uint16_t(c.a[r] >> 16), kind);
                }
                B[2 * t][g] = mma_in(uint16_t(c.b0 & 0xffffu), kind);
                B[2 * t + 1][g] = mma_in(uint16_t(c.b0 >> 16), kind);
                B[2 * t + 8][g] = mma_in(uint16_t(c.b1 & 0xffffu), kind);
                B[2 * t + 9][g] = mma_in(uint16_t(c.b1 >> 16), kind);
                C[g][2 * t] = c.d[0];
                C[g][2 * t + 1] = c.d[1];
                C[g + 8][2 * t] = c.d[2];
                C[g + 8][2 * t + 1] = c.d[3];
            }
            // Products are exact in f32 (11 x 11 or 8 x 8 significant bits); they are summed
            // in f32 in k order onto the accumulator.
            float D[16][8];
            for (int i = 0; i < 16; ++i)
                for (int j = 0; j < 8; ++j) {
                    float s = C[i][j];
                    for (int k = 0; k < 16; ++k) s += A[i][k] * B[k][j];
                    D[i][j] = s;
                }
            for (int l = 0; l < kWarp; ++l) {
                const Coll& c = lane_fiber(warp, l).coll;
                const int g = l / 4, t = l % 4;
                c.d[0] = D[g][2 * t];
                c.d[1] = D[g][2 * t + 1];
                c.d[2] = D[g + 8][2 * t];
                c.d[3] = D[g + 8][2 * t + 1];
            }
            break;
        }
    }
}

void try_complete_barrier(Cta& C) {
    Launch& L = *t_launch;
    if (C.at_barrier == 0 || C.at_barrier + C.exited != L.nthreads) return;
    if (C.exited > 0) {
        fail(fmt("%u threads exited before the barrier that %u threads wait at", C.exited, C.at_barrier));
    }
    Fiber* const fs = &L.fibers[size_t(&C - L.ctas.data()) * L.nthreads];
    const Fiber* first = nullptr;
    for (uint32_t i = 0; i < L.nthreads; ++i) {
        const Fiber& f = fs[i];
        if (f.state != State::AtBarrier) continue;
        if (first == nullptr) {
            first = &f;
        } else if (f.site_line != first->site_line || strcmp(f.site_file, first->site_file) != 0) {
            fail(fmt("threads wait at different barriers: %s at %s:%d, %s at %s:%d",
                     thread_name(first->gid).c_str(), first->site_file, first->site_line,
                     thread_name(f.gid).c_str(), f.site_file, f.site_line));
        }
    }
    ++C.bar_epoch;
    for (auto& e : C.warp_epoch) ++e;
    C.at_barrier = 0;
    for (uint32_t i = 0; i < L.nthreads; ++i)
        if (fs[i].state == State::AtBarrier) fs[i].state = State::Runnable;
}

// The cluster barrier (barrier.cluster.arrive, then barrier.cluster.wait): phase k completes
// once every thread of every CTA of the cluster has arrived k + 1 times; a thread's wait
// for it returns then. Everything a thread did before its arrival is ordered before
// everything any thread does after its wait for that phase (the race checker's rule).
// Wakes the threads waiting for a phase that is now complete.
void release_cluster_waiters() {
    Launch& L = *t_launch;
    uint32_t done = UINT32_MAX;  // phases complete: the fewest arrivals of any thread
    for (const Fiber& f : L.fibers) done = std::min(done, f.arrives);
    for (Fiber& f : L.fibers)
        if (f.state == State::AtCluster && f.waits < done) f.state = State::Runnable;
}

// ---------------------------------------------------------------------------------------
// One CTA.

void reset_shared(Launch& L, Cta& C) {
    const size_t n = std::min(std::max(C.used_hi, L.dyn + kRedZone), kArenaBytes);
    memset(C.shadow, 0, n * sizeof(Shadow));
    for (size_t i = 0; i < n; ++i) {
        C.shadow[i].w_tid = -1;
        C.shadow[i].r_tid = -1;
        C.shadow[i].r_warp = -1;
        C.shadow[i].rr_tid = -1;
    }
    memset(C.arena, 0xA5, n);  // garbage, as uninitialised shared memory is
    for (size_t i = 0; i < L.dyn; ++i) C.shadow[i].flags = kAlloc;
    C.used_hi = L.dyn + kRedZone;
    C.statics.clear();
}

// Runs one cluster (one CTA without clusters) whose first block is `first`: every thread of
// its CTAs, CTA by CTA, each pass to its next synchronisation point. The CTAs go in rank
// order in even clusters and in reverse rank order in odd ones (`reverse`), so a grid of
// several clusters shows the cross-CTA checks both interleavings.
void run_cluster(Launch& L, Dim3 first, bool reverse) {
    const Dim3 c = L.cluster;
    for (uint32_t r = 0; r < L.csize; ++r) {
        Cta& C = L.ctas[r];
        C.bid = Dim3{first.x + r % c.x, first.y + (r / c.x) % c.y, first.z + r / (c.x * c.y)};
        reset_shared(L, C);
        C.bar_epoch = 1;
        C.warp_epoch.assign(L.nwarps, 1u);
        C.at_barrier = 0;
        C.exited = 0;
    }
    L.phase_site.clear();
    L.exited_all = 0;
    const uint32_t all = L.csize * L.nthreads;
    for (uint32_t g = 0; g < all; ++g) {
        const uint32_t i = g % L.nthreads;
        Fiber& f = L.fibers[g];
        f.state = State::Runnable;
        f.linear = int(i);
        f.cta = int(g / L.nthreads);
        f.gid = int(g);
        f.tid = Dim3{i % L.block.x, (i / L.block.x) % L.block.y, i / (L.block.x * L.block.y)};
        f.site_file = "kernel entry";
        f.site_line = 0;
        f.arrives = 0;
        f.waits = 0;
        f.open_group.clear();
        f.groups.clear();
        fiber_init(f, L.pool->stacks[g]);
    }
    for (;;) {
        bool ran = false;
        for (uint32_t k = 0; k < all && !L.failed; ++k) {
            const uint32_t r = k / L.nthreads;
            const uint32_t g = (reverse ? L.csize - 1 - r : r) * L.nthreads + k % L.nthreads;
            if (L.fibers[g].state != State::Runnable) continue;
            run_fiber(int(g));
            ran = true;
        }
        if (L.failed) return;
        if (L.exited_all == all) return;
        if (!ran) {
            std::string s = "deadlock: no thread can go on;";
            int shown = 0;
            for (const Fiber& f : L.fibers) {
                if (f.state == State::Exited || shown >= 4) continue;
                ++shown;
                s += fmt(" %s %s at %s:%d;", thread_name(f.gid).c_str(),
                         f.state == State::AtBarrier   ? "waits at a barrier"
                         : f.state == State::AtCluster ? "waits at a cluster barrier"
                                                       : "waits at a warp collective",
                         f.state == State::AtWarp ? f.coll.file : f.site_file,
                         f.state == State::AtWarp ? f.coll.line : f.site_line);
            }
            fail_sched(s);
            return;
        }
    }
}

void land_copies(const std::vector<CpCopy>& g) {
    Cta& C = cur_cta();
    for (const CpCopy& c : g) {
        for (size_t i = c.dst; i < c.dst + 16; ++i) C.shadow[i].flags &= uint8_t(~kPending);
        if (c.valid) {
            memcpy(C.arena + c.dst, c.src, 16);
        } else {
            memset(C.arena + c.dst, 0, 16);
        }
        // The copy's write belongs to the issuing thread, at the time it lands.
        shared_access(cur().cta, c.dst, 16, true, false);
    }
}

}  // namespace

// ---------------------------------------------------------------------------------------
// The kernel-facing API.

Dim3 thread_idx() { return cur().tid; }
Dim3 block_idx() { return cur_cta().bid; }
Dim3 block_dim() { return t_launch->block; }
Dim3 grid_dim() {
    const auto* d = t_launch->desc;
    return Dim3{d->grid[0], d->grid[1], d->grid[2]};
}

namespace {
// A lane that arrives at a barrier while a lane of its warp waits for it at a collective.
void check_no_lane_waits(const char* file, int line, const char* what) {
    const Fiber& me = cur();
    const int warp = me.linear / kWarp;
    for (int l = 0; l < kWarp; ++l) {
        if (uint32_t(warp * kWarp + l) >= t_launch->nthreads) break;
        const Fiber& o = lane_fiber(warp, l);
        if (o.state == State::AtWarp && (o.coll.mask & (1u << (me.linear % kWarp)))) {
            fail(fmt("lanes disagree: this lane is at %s (%s:%d) while lane %d of its warp waits for it at a warp "
                     "collective (%s:%d)",
                     what, file, line, l, o.coll.file, o.coll.line));
        }
    }
}
}  // namespace

void syncthreads(const char* file, int line) {
    Fiber& me = cur();
    // A thread's own cp.async copies are not covered by a barrier (only by a wait).
    me.state = State::AtBarrier;
    me.site_file = file;
    me.site_line = line;
    check_no_lane_waits(file, line, "__syncthreads");
    Cta& C = cur_cta();
    ++C.at_barrier;
    try_complete_barrier(C);
    // Also the thread that completed the barrier: every thread resumes in order.
    switch_to_scheduler();
    block_until_runnable();
}

void syncwarp(const char* file, int line, unsigned mask) {
    Coll c{};
    c.kind = CollKind::Syncwarp;
    c.file = file;
    c.line = line;
    c.mask = mask;
    arrive_warp(c);
}

uint64_t shfl_raw(const char* file, int line, int mode, unsigned mask, uint64_t value, int bytes, int c, int width) {
    if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
        fail(fmt("shuffle at %s:%d with width %d (must be a power of two up to 32)", file, line, width));
    }
    Coll k{};
    k.kind = CollKind::Shfl;
    k.file = file;
    k.line = line;
    k.mask = mask;
    k.mode = mode;
    k.value = value;
    k.bytes = bytes;
    k.c = c;
    k.width = width;
    arrive_warp(k);
    return cur().coll.result;
}

unsigned vote(const char* file, int line, int mode, unsigned mask, bool pred) {
    Coll k{};
    k.kind = CollKind::Vote;
    k.file = file;
    k.line = line;
    k.mask = mask;
    k.mode = mode;
    k.value = pred ? 1 : 0;
    arrive_warp(k);
    return unsigned(cur().coll.result);
}

unsigned match_any(const char* file, int line, unsigned mask, uint64_t value) {
    Coll k{};
    k.kind = CollKind::Vote;
    k.file = file;
    k.line = line;
    k.mask = mask;
    k.mode = kVoteMatchAny;
    k.value = value;
    arrive_warp(k);
    return unsigned(cur().coll.result);
}

unsigned activemask() {
    // Every non-exited lane of the warp: the emulator runs a warp's lanes converged.
    Launch& L = *t_launch;
    const int warp = cur().linear / kWarp;
    unsigned m = 0;
    for (int l = 0; l < kWarp; ++l) {
        const uint32_t t = uint32_t(warp * kWarp + l);
        if (t < L.nthreads && lane_fiber(warp, l).state != State::Exited) m |= 1u << l;
    }
    return m;
}

void trap(const char* file, int line) { fail(fmt("__trap() at %s:%d", file, line)); }

uint32_t cluster_ctarank() { return uint32_t(cur().cta); }
uint32_t cluster_nctarank() { return t_launch->csize; }

void* cluster_map_shared(const char* file, int line, const void* p, uint32_t rank) {
    Launch& L = *t_launch;
    const Cta& C = cur_cta();
    const char* c = static_cast<const char*>(p);
    if (c < C.arena || c >= C.arena + kArenaBytes) {
        fail(fmt("mapa at %s:%d of an address outside the CTA's own shared memory", file, line));
    }
    if (rank >= L.csize) {
        fail(fmt("mapa at %s:%d to CTA rank %u of a cluster of %u", file, line, rank, L.csize));
    }
    return L.ctas[rank].arena + (c - C.arena);
}

void cluster_arrive(const char* file, int line) {
    Launch& L = *t_launch;
    Fiber& me = cur();
    if (me.arrives > me.waits) {
        fail(fmt("arrives at a cluster barrier (%s:%d) again before waiting for its previous arrival", file, line));
    }
    const uint32_t phase = me.arrives;
    if (L.phase_site.size() <= phase) {
        L.phase_site.emplace_back(file, line);
    } else if (L.phase_site[phase].second != line || strcmp(L.phase_site[phase].first, file) != 0) {
        fail(fmt("threads arrive at different cluster barriers: this one at %s:%d, another at %s:%d", file, line,
                 L.phase_site[phase].first, L.phase_site[phase].second));
    }
    ++me.arrives;
    release_cluster_waiters();
}

void cluster_wait(const char* file, int line) {
    Fiber& me = cur();
    if (me.waits >= me.arrives) fail(fmt("waits at a cluster barrier (%s:%d) without having arrived", file, line));
    me.state = State::AtCluster;
    me.site_file = file;
    me.site_line = line;
    check_no_lane_waits(file, line, "a cluster barrier");
    release_cluster_waiters();
    // Also when the phase is already complete: every thread resumes in order.
    switch_to_scheduler();
    block_until_runnable();
    ++me.waits;
}

void cluster_sync(const char* file, int line) {
    cluster_arrive(file, line);
    cluster_wait(file, line);
}

uint32_t smem_addr(const void* p) {
    const Cta& C = cur_cta();
    const char* c = static_cast<const char*>(p);
    if (c < C.arena || c >= C.arena + kArenaBytes) {
        fail("__cvta_generic_to_shared of an address outside the CTA's own shared memory");
    }
    return uint32_t(c - C.arena);
}

void* dynamic_smem(size_t align) {
    if (align > 256) fail(fmt("dynamic shared memory aligned to %zu bytes (at most 256 supported)", align));
    return cur_cta().arena;
}

uint32_t dynamic_smem_size() { return uint32_t(t_launch->dyn); }

void* static_smem(const void* key, size_t bytes, size_t align, const char* file, int line) {
    Cta& L = cur_cta();
    auto it = L.statics.find(key);
    if (it == L.statics.end()) {
        size_t off = (L.used_hi + align - 1) / align * align;
        if (off + bytes + kRedZone > kArenaBytes) {
            fail(fmt("static shared array at %s:%d (%zu bytes) does not fit the emulator's arena", file, line, bytes));
        }
        for (size_t i = off; i < off + bytes; ++i) L.shadow[i].flags |= kAlloc;
        L.used_hi = off + bytes + kRedZone;
        it = L.statics.emplace(key, std::make_pair(off, bytes)).first;
    }
    return L.arena + it->second.first;
}

void cp_async_16(const char* file, int line, uint32_t dst, const void* src, bool valid) {
    Cta& C = cur_cta();
    Fiber& me = cur();
    if (dst % 16 != 0) fail(fmt("cp.async at %s:%d: shared destination %#x is not 16-byte aligned", file, line, dst));
    if (size_t(dst) + 16 > kArenaBytes) fail(fmt("cp.async at %s:%d: destination %#x leaves shared memory", file, line, dst));
    if (valid) {
        if (reinterpret_cast<uintptr_t>(src) % 16 != 0) {
            fail(fmt("cp.async at %s:%d: global source %p is not 16-byte aligned", file, line, src));
        }
        const LongctxEmuBuffer* b = find_buffer(reinterpret_cast<uintptr_t>(src));
        if (b == nullptr || reinterpret_cast<uintptr_t>(src) + 16 > b->base + b->bytes) {
            fail(fmt("cp.async at %s:%d reads 16 bytes at %p, outside every buffer of the launch", file, line, src));
        }
    }
    // The destination may be written from now on: check it like a write, then poison it
    // until a wait covers the copy.
    shared_access(me.cta, dst, 16, true, false);
    for (size_t i = dst; i < size_t(dst) + 16; ++i) C.shadow[i].flags |= kPending;
    memset(C.arena + dst, 0xFF, 16);
    me.open_group.push_back(CpCopy{dst, src, valid});
}

void cp_async_commit() {
    Fiber& me = cur();
    me.groups.push_back(std::move(me.open_group));
    me.open_group.clear();
}

void cp_async_wait(int pending) {
    Fiber& me = cur();
    while (int(me.groups.size()) > pending) {
        std::vector<CpCopy> g = std::move(me.groups.front());
        me.groups.erase(me.groups.begin());
        land_copies(g);
    }
}

void mma_16816(const char* file, int line, int kind, float* d, const uint32_t* a, uint32_t b0, uint32_t b1) {
    Coll k{};
    k.kind = CollKind::Mma;
    k.file = file;
    k.line = line;
    k.mask = warp_lanes(cur().linear / kWarp);
    if (k.mask != 0xffffffffu) fail("mma.sync in a partial warp");
    k.mode = kind;
    k.d = d;
    k.a = a;
    k.b0 = b0;
    k.b1 = b1;
    arrive_warp(k);
}

void ldmatrix(const char* file, int line, int count, bool trans, uint32_t* r, uint32_t addr) {
    Coll k{};
    k.kind = CollKind::Ldmatrix;
    k.file = file;
    k.line = line;
    k.mask = warp_lanes(cur().linear / kWarp);
    if (k.mask != 0xffffffffu) fail("ldmatrix in a partial warp");
    k.mode = count;
    k.trans = trans;
    k.regs = r;
    k.addr = addr;
    arrive_warp(k);
}

namespace {
float ftz(float x) { return fabsf(x) < 1.17549435e-38f ? copysignf(0.f, x) : x; }
}  // namespace

float ex2_approx_ftz(float x) { return ftz(exp2f(ftz(x))); }
float rcp_approx_ftz(float x) { return ftz(1.f / ftz(x)); }

template <typename T, typename F>
static T rmw(T* p, F f) {
    access(p, sizeof(T), true, true);
    const T old = *p;
    *p = f(old);
    return old;
}
float atomic_add_f32(float* p, float v) { return rmw(p, [v](float o) { return o + v; }); }
int atomic_add_i32(int* p, int v) { return rmw(p, [v](int o) { return int(unsigned(o) + unsigned(v)); }); }
unsigned atomic_add_u32(unsigned* p, unsigned v) { return rmw(p, [v](unsigned o) { return o + v; }); }
int atomic_max_i32(int* p, int v) { return rmw(p, [v](int o) { return std::max(o, v); }); }
int atomic_cas_i32(int* p, int cmp, int v) { return rmw(p, [cmp, v](int o) { return o == cmp ? v : o; }); }

}  // namespace longctx_emu

using namespace longctx_emu;

extern "C" int longctx_emu_launch(const LongctxEmuLaunch* d, char* err, uint64_t err_len) {
    auto report = [&](const std::string& s) {
        if (err_len > 0) {
            snprintf(err, size_t(err_len), "%s", s.c_str());
        }
        return 1;
    };
    if (t_launch != nullptr) return report("emulated launch from inside an emulated kernel");
    const uint64_t nthreads = uint64_t(d->block[0]) * d->block[1] * d->block[2];
    if (nthreads == 0 || nthreads > kMaxThreads) {
        return report(fmt("kernel %s: block of %lu threads (1 to %u)", d->kernel, (unsigned long)nthreads, kMaxThreads));
    }
    if (d->grid[0] == 0 || d->grid[1] == 0 || d->grid[2] == 0) return report(fmt("kernel %s: empty grid", d->kernel));
    for (int i = 0; i < 3; ++i) {
        if (d->cluster[i] == 0 || d->grid[i] % d->cluster[i] != 0) {
            return report(fmt("kernel %s: cluster (%u,%u,%u) does not divide the grid (%u,%u,%u)", d->kernel,
                              d->cluster[0], d->cluster[1], d->cluster[2], d->grid[0], d->grid[1], d->grid[2]));
        }
    }
    const uint64_t csize = uint64_t(d->cluster[0]) * d->cluster[1] * d->cluster[2];
    if (csize > 8) return report(fmt("kernel %s: cluster of %lu CTAs (at most 8)", d->kernel, (unsigned long)csize));
    if (size_t(d->dyn_smem) + 2 * kRedZone > kArenaBytes) {
        return report(fmt("kernel %s: %u bytes of dynamic shared memory exceed the emulator's arena", d->kernel,
                          d->dyn_smem));
    }
    image_segments();
    Pool* pool = nullptr;
    {
        std::lock_guard<std::mutex> g(g_pool_lock);
        if (!g_pools.empty()) {
            pool = g_pools.back();
            g_pools.pop_back();
        }
    }
    if (pool == nullptr) pool = new Pool;
    auto give_back = [&] {
        std::lock_guard<std::mutex> g(g_pool_lock);
        g_pools.push_back(pool);
    };
    while (pool->arenas.size() < csize) {
        void* a = mmap(nullptr, kArenaBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        void* s = mmap(nullptr, kArenaBytes * sizeof(Shadow), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (a == MAP_FAILED || s == MAP_FAILED) {
            give_back();
            return report("could not map the shared-memory arena");
        }
        pool->arenas.push_back(static_cast<char*>(a));
        pool->shadows.push_back(static_cast<Shadow*>(s));
    }
    while (pool->stacks.size() < nthreads * csize) {
        void* m = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) {
            give_back();
            return report("could not map a fiber stack");
        }
        pool->stacks.push_back(static_cast<char*>(m));
    }
    Launch L;
    L.desc = d;
    L.buffers.assign(d->buffers, d->buffers + d->n_buffers);
    std::sort(L.buffers.begin(), L.buffers.end(),
              [](const LongctxEmuBuffer& a, const LongctxEmuBuffer& b) { return a.base < b.base; });
    L.block = Dim3{d->block[0], d->block[1], d->block[2]};
    L.nthreads = uint32_t(nthreads);
    L.nwarps = (L.nthreads + kWarp - 1) / kWarp;
    L.cluster = Dim3{d->cluster[0], d->cluster[1], d->cluster[2]};
    L.csize = uint32_t(csize);
    L.fibers.resize(L.nthreads * L.csize);
    L.ctas.resize(L.csize);
    for (uint32_t r = 0; r < L.csize; ++r) {
        L.ctas[r].arena = pool->arenas[r];
        L.ctas[r].shadow = pool->shadows[r];
        L.ctas[r].used_hi = kArenaBytes;  // the first reset clears everything
    }
    L.pool = pool;
    L.dyn = d->dyn_smem;
    t_launch = &L;
    uint64_t n_cluster = 0;
    for (uint32_t z = 0; z < d->grid[2] && !L.failed; z += L.cluster.z)
        for (uint32_t y = 0; y < d->grid[1] && !L.failed; y += L.cluster.y)
            for (uint32_t x = 0; x < d->grid[0] && !L.failed; x += L.cluster.x)
                run_cluster(L, Dim3{x, y, z}, (n_cluster++ & 1) != 0);
    t_launch = nullptr;
    give_back();
    if (L.failed) return report(L.error);
    return 0;
}

// ---------------------------------------------------------------------------------------
// Thread-sanitizer instrumentation hooks: the kernel objects are compiled with
// -fsanitize=thread and call these for every memory access; no sanitizer runtime is linked.

extern "C" {
#define LONGCTX_EMU_HOOK(N)                                                              \
    void __tsan_read##N(void* p) { access(p, N, false); }                                \
    void __tsan_write##N(void* p) { access(p, N, true); }                                \
    void __tsan_unaligned_read##N(void* p) { access(p, N, false); }                      \
    void __tsan_unaligned_write##N(void* p) { access(p, N, true); }                      \
    void __tsan_volatile_read##N(void* p) { access(p, N, false); }                       \
    void __tsan_volatile_write##N(void* p) { access(p, N, true); }
LONGCTX_EMU_HOOK(1)
LONGCTX_EMU_HOOK(2)
LONGCTX_EMU_HOOK(4)
LONGCTX_EMU_HOOK(8)
LONGCTX_EMU_HOOK(16)
#undef LONGCTX_EMU_HOOK
void __tsan_read_range(void* p, unsigned long n) { access(p, n, false); }
void __tsan_write_range(void* p, unsigned long n) { access(p, n, true); }
// clang instruments memory intrinsics as calls to these.
void* __tsan_memcpy(void* d, const void* s, unsigned long n) {
    access(s, n, false);
    access(d, n, true);
    return memcpy(d, s, n);
}
void* __tsan_memmove(void* d, const void* s, unsigned long n) {
    access(s, n, false);
    access(d, n, true);
    return memmove(d, s, n);
}
void* __tsan_memset(void* d, int c, unsigned long n) {
    access(d, n, true);
    return memset(d, c, n);
}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_init() {}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}
}
