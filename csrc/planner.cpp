// Packing planner: GRPO groups -> data-parallel ranks by multi-way Karmarkar-Karp (largest
// differencing), then each rank's samples -> micro-batches under a token budget by
// first-fit decreasing. The algorithm, its cost model and its guarantees are documented on
// the Python side (staged/packing/planner.py); its pure-Python twin `plan_python` there must
// give IDENTICAL output and IDENTICAL ValueError messages: change both or neither
// (tests/packing/test_planner.py compares them on thousands of random inputs).
//
// Bit-exactness with Python: costs are doubles computed in the same order as in Python, and
// every later floating-point operation is an addition or a subtraction, which IEEE 754
// rounds identically everywhere. The one thing a compiler could change is fusing
// `a * L + b * L2` into a fused multiply-add (one rounding instead of two), hence the pragmas
// (checked: with -march=haswell -ffp-contract=fast and no pragma, GCC emits vfmadd and the
// agreement tests fail). 32-bit x87 builds would also need -mfpmath=sse; x86-64 and arm64 do
// not. All orderings are total (ties broken by index or by stable sorts), so the output does
// not depend on the heap or sort implementation.
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#elif defined(_MSC_VER)
#pragma fp_contract(off)
#endif

#include "planner.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <new>
#include <queue>
#include <utility>
#include <vector>

namespace staged {

const char kPlanMicroBatchesDoc[] =
    "plan_micro_batches(lengths, group_ids, vision_patches, token_budget, num_ranks,\n"
    "                   cost_a, cost_b, cost_vision) -> list[rank][micro-batch][sample]\n"
    "\n"
    "C++ packing planner (all arguments positional; group_ids and vision_patches may be None).\n"
    "Use staged.packing.plan_micro_batches, which documents it and wraps the result.";

namespace {

// Bounds, identical in the Python twin.
constexpr long long kMaxCount = 2147483647LL;  // 2^31-1 per sample: L*L is exact in int64
constexpr long long kMaxRanks = 1LL << 20;     // guards a swapped argument; memory is O(G*k)
constexpr long long kBudgetCap = 1LL << 62;    // any larger budget packs identically
constexpr double kMaxTotalCost = 1e300;        // no partial sum can overflow below this

// Holds one reference; releases it on every exit path.
struct Ref {
  PyObject* p = nullptr;
  explicit Ref(PyObject* obj) : p(obj) {}
  Ref(const Ref&) = delete;
  Ref& operator=(const Ref&) = delete;
  ~Ref() { Py_XDECREF(p); }
};

// Reads an integer from anything with __index__ (int, numpy integer, 0-d integer tensor).
// Returns false with a Python error set when it is no integer; *overflow is +1/-1 when it does
// not fit in a long long (the caller then reports the object itself).
bool read_int(PyObject* obj, long long* out, int* overflow) {
  Ref index(PyNumber_Index(obj));
  if (!index.p) return false;
  *out = PyLong_AsLongLongAndOverflow(index.p, overflow);
  return !(*out == -1 && *overflow == 0 && PyErr_Occurred());
}

// Raises ValueError for an out-of-range integer: `format` takes the index i (%zd) and then the
// integer itself (%S), printed from the object because it may not fit in a long long.
void value_error_at(const char* format, Py_ssize_t i, PyObject* obj) {
  Ref index(PyNumber_Index(obj));
  if (index.p) PyErr_Format(PyExc_ValueError, format, i, index.p);
}

// ---------------------------------------------------------------------------------------
// Inputs, read and checked while holding the GIL.

struct Inputs {
  long long ranks = 0;
  long long budget = 0;                 // min(token_budget, kBudgetCap)
  std::vector<long long> length;        // [n] tokens per sample
  std::vector<double> cost;             // [n] a*L + b*L^2 + v*P
  long long num_groups = 0;
  std::vector<long long> group_start;   // [G+1] CSR over group_member
  std::vector<long long> group_member;  // [n] sample indices, ascending within a group
  std::vector<double> group_load;       // [G] sum of member costs in index order
};

bool check_coefficient(const char* name, double x) {
  if (x >= 0.0 && std::isfinite(x)) return true;
  Ref value(PyFloat_FromDouble(x));
  if (value.p) PyErr_Format(PyExc_ValueError, "%s must be a finite number >= 0, got %R", name, value.p);
  return false;
}

bool read_inputs(PyObject* args, Inputs* in) {
  PyObject *lengths_obj, *groups_obj, *patches_obj, *budget_obj, *ranks_obj;
  double a, b, v;
  if (!PyArg_ParseTuple(args, "OOOOOddd:plan_micro_batches", &lengths_obj, &groups_obj,
                        &patches_obj, &budget_obj, &ranks_obj, &a, &b, &v))
    return false;

  int overflow = 0;
  if (!read_int(ranks_obj, &in->ranks, &overflow)) return false;
  if (overflow || in->ranks < 1 || in->ranks > kMaxRanks) {
    Ref index(PyNumber_Index(ranks_obj));
    if (index.p) PyErr_Format(PyExc_ValueError, "num_ranks must be in [1, 1048576], got %S", index.p);
    return false;
  }
  if (!read_int(budget_obj, &in->budget, &overflow)) return false;
  if (overflow < 0 || (!overflow && in->budget < 1)) {
    Ref index(PyNumber_Index(budget_obj));
    if (index.p)
      PyErr_Format(PyExc_ValueError, "token_budget must be >= 1 (tokens per micro-batch), got %S",
                   index.p);
    return false;
  }
  in->budget = overflow > 0 ? kBudgetCap : std::min(in->budget, kBudgetCap);
  if (!check_coefficient("cost_a", a) || !check_coefficient("cost_b", b) ||
      !check_coefficient("cost_vision", v))
    return false;

  // Tuples, not the caller's lists: __index__/__hash__/__eq__ may run Python code, which must
  // not be able to resize what we are reading (a tuple argument is taken as is, a list copied).
  Ref lengths(PySequence_Tuple(lengths_obj));
  if (!lengths.p) return false;
  const Py_ssize_t n = PyTuple_GET_SIZE(lengths.p);
  Ref groups(groups_obj == Py_None ? nullptr : PySequence_Tuple(groups_obj));
  if (groups_obj != Py_None) {
    if (!groups.p) return false;
    if (PyTuple_GET_SIZE(groups.p) != n) {
      PyErr_Format(PyExc_ValueError,
                   "group_ids has %zd entries but lengths has %zd: give one GRPO group id per sample",
                   PyTuple_GET_SIZE(groups.p), n);
      return false;
    }
  }
  Ref patches(patches_obj == Py_None ? nullptr : PySequence_Tuple(patches_obj));
  if (patches_obj != Py_None) {
    if (!patches.p) return false;
    if (PyTuple_GET_SIZE(patches.p) != n) {
      PyErr_Format(PyExc_ValueError,
                   "vision_patches has %zd entries but lengths has %zd: give one count per sample",
                   PyTuple_GET_SIZE(patches.p), n);
      return false;
    }
  }

  // Per sample, in index order: length, budget, patches, group id (the twin's order).
  in->length.resize(n);
  in->cost.resize(n);
  std::vector<long long> group_of(n);
  Ref group_number(PyDict_New());  // group id -> dense number, same semantics as a Python dict
  if (!group_number.p) return false;
  // PySequence_Fast_ITEMS reads a tuple's items as well as a list's.
  PyObject** length_items = PySequence_Fast_ITEMS(lengths.p);
  PyObject** group_items = groups.p ? PySequence_Fast_ITEMS(groups.p) : nullptr;
  PyObject** patch_items = patches.p ? PySequence_Fast_ITEMS(patches.p) : nullptr;
  double total = 0.0;
  for (Py_ssize_t i = 0; i < n; ++i) {
    long long L = 0, P = 0;
    if (!read_int(length_items[i], &L, &overflow)) return false;
    if (overflow || L < 0 || L > kMaxCount) {
      value_error_at("lengths[%zd] is %S: token counts must be in [0, 2147483647]", i,
                     length_items[i]);
      return false;
    }
    if (L > in->budget) {
      PyErr_Format(PyExc_ValueError,
                   "sample %zd has %lld tokens, more than the token budget of %lld per micro-batch",
                   i, L, in->budget);
      return false;
    }
    if (patch_items) {
      if (!read_int(patch_items[i], &P, &overflow)) return false;
      if (overflow || P < 0 || P > kMaxCount) {
        value_error_at("vision_patches[%zd] is %S: patch counts must be in [0, 2147483647]", i,
                       patch_items[i]);
        return false;
      }
    }
    if (group_items) {
      PyObject* found = PyDict_GetItemWithError(group_number.p, group_items[i]);  // borrowed
      if (found) {
        group_of[i] = PyLong_AsLongLong(found);
      } else {
        if (PyErr_Occurred()) return false;  // unhashable group id
        Ref number(PyLong_FromLongLong(in->num_groups));
        if (!number.p || PyDict_SetItem(group_number.p, group_items[i], number.p) < 0)
          return false;
        group_of[i] = in->num_groups++;
      }
    } else {
      group_of[i] = in->num_groups++;  // no group ids: every sample is its own group
    }
    // Same expression, same order as Python's `a * L + b * (L * L) + v * P`.
    const double c = a * static_cast<double>(L) + b * static_cast<double>(L * L) +
                     v * static_cast<double>(P);
    in->length[i] = L;
    in->cost[i] = c;
    total += c;
  }
  if (!(total <= kMaxTotalCost)) {
    Ref value(PyFloat_FromDouble(total));
    if (value.p)
      PyErr_Format(PyExc_ValueError,
                   "the total cost of all samples is %R, too close to overflowing a double: "
                   "lower cost_a, cost_b or cost_vision",
                   value.p);
    return false;
  }

  const long long G = in->num_groups;
  in->group_start.assign(G + 1, 0);
  in->group_load.assign(G, 0.0);
  for (Py_ssize_t i = 0; i < n; ++i) {
    in->group_start[group_of[i] + 1] += 1;
    in->group_load[group_of[i]] += in->cost[i];
  }
  for (long long g = 0; g < G; ++g) in->group_start[g + 1] += in->group_start[g];
  in->group_member.resize(n);
  std::vector<long long> fill(in->group_start.begin(), in->group_start.end() - 1);
  for (Py_ssize_t i = 0; i < n; ++i) in->group_member[fill[group_of[i]]++] = i;
  return true;
}

// ---------------------------------------------------------------------------------------
// Groups -> ranks: multi-way Karmarkar-Karp. Runs without the GIL.

// k subsets of groups, heaviest first. A subset's groups form a linked list through
// next_group, so joining two subsets is O(1).
struct Partition {
  std::vector<double> load;      // [k]
  std::vector<long long> head;   // [k] first group, -1 when empty
  std::vector<long long> tail;   // [k] last group, -1 when empty
};

// A heap entry: a merged partition, or one group not merged yet (kept implicit, so memory is
// O(k) per merged partition alive, not O(k) per group).
struct Entry {
  double spread;  // heaviest minus lightest subset load: what differencing removes
  long long id;   // ties: groups are 0..G-1 (first appearance), merges G, G+1, ...
  long long slot; // >= 0: pool[slot]; < 0: the single group -1 - slot
};

// std::priority_queue puts the "largest" on top: largest spread, then smallest id.
struct LowerPriority {
  bool operator()(const Entry& x, const Entry& y) const {
    if (x.spread != y.spread) return x.spread < y.spread;
    return x.id > y.id;
  }
};

class KarmarkarKarp {
 public:
  explicit KarmarkarKarp(const Inputs& in) : in_(in), k_(in.ranks), next_group_(in.num_groups, -1) {}

  // Returns, for each rank, its groups' linked list head (rank 0 = heaviest load).
  std::vector<long long> assign(std::vector<long long>* next_group) {
    std::vector<long long> rank_head(k_, -1);
    const long long G = in_.num_groups;
    if (G > 0) {
      std::priority_queue<Entry, std::vector<Entry>, LowerPriority> heap;
      for (long long g = 0; g < G; ++g)
        heap.push(Entry{k_ == 1 ? 0.0 : in_.group_load[g], g, -1 - g});
      long long next_id = G;
      while (heap.size() > 1) {
        const Entry x = heap.top();
        heap.pop();
        const Entry y = heap.top();
        heap.pop();
        const long long slot = new_slot();
        merge(view(x, &scratch_x_), view(y, &scratch_y_), &pool_[slot]);
        release(x);
        release(y);
        const Partition& p = pool_[slot];
        heap.push(Entry{p.load[0] - p.load[k_ - 1], next_id++, slot});
      }
      const Partition& final_partition = view(heap.top(), &scratch_x_);
      rank_head = final_partition.head;
    }
    *next_group = std::move(next_group_);
    return rank_head;
  }

 private:
  const Partition& view(const Entry& e, Partition* scratch) {
    if (e.slot >= 0) return pool_[e.slot];
    const long long g = -1 - e.slot;
    scratch->load.assign(k_, 0.0);
    scratch->head.assign(k_, -1);
    scratch->tail.assign(k_, -1);
    scratch->load[0] = in_.group_load[g];
    scratch->head[0] = scratch->tail[0] = g;
    return *scratch;
  }

  // Differencing: x's heaviest subset joins y's lightest, and so on; then re-sort by load,
  // heaviest first (stable, so equal loads keep their position: the twin's sorted()).
  void merge(const Partition& x, const Partition& y, Partition* out) {
    joined_load_.resize(k_);
    joined_head_.resize(k_);
    joined_tail_.resize(k_);
    for (long long j = 0; j < k_; ++j) {
      const long long r = k_ - 1 - j;
      joined_load_[j] = x.load[j] + y.load[r];
      if (x.head[j] < 0) {
        joined_head_[j] = y.head[r];
        joined_tail_[j] = y.tail[r];
      } else if (y.head[r] < 0) {
        joined_head_[j] = x.head[j];
        joined_tail_[j] = x.tail[j];
      } else {
        next_group_[x.tail[j]] = y.head[r];
        joined_head_[j] = x.head[j];
        joined_tail_[j] = y.tail[r];
      }
    }
    order_.resize(k_);
    for (long long j = 0; j < k_; ++j) order_[j] = j;
    std::stable_sort(order_.begin(), order_.end(),
                     [this](long long p, long long q) { return joined_load_[p] > joined_load_[q]; });
    out->load.resize(k_);
    out->head.resize(k_);
    out->tail.resize(k_);
    for (long long j = 0; j < k_; ++j) {
      out->load[j] = joined_load_[order_[j]];
      out->head[j] = joined_head_[order_[j]];
      out->tail[j] = joined_tail_[order_[j]];
    }
  }

  long long new_slot() {
    if (!free_slots_.empty()) {
      const long long s = free_slots_.back();
      free_slots_.pop_back();
      return s;
    }
    pool_.emplace_back();
    return static_cast<long long>(pool_.size()) - 1;
  }

  void release(const Entry& e) {
    if (e.slot >= 0) free_slots_.push_back(e.slot);
  }

  const Inputs& in_;
  const long long k_;
  std::vector<long long> next_group_;
  std::vector<Partition> pool_;
  std::vector<long long> free_slots_;
  Partition scratch_x_, scratch_y_;
  std::vector<double> joined_load_;
  std::vector<long long> joined_head_, joined_tail_, order_;
};

// ---------------------------------------------------------------------------------------
// One rank's samples -> micro-batches: first-fit decreasing. Runs without the GIL.

// Leftmost micro-batch with room for `need` tokens in O(log n): a max-tree over the room
// left in each micro-batch. Unopened micro-batches have the full budget, and they all come
// after the opened ones, so "leftmost with room" is first fit, opening a new one when no
// open one has room.
class FirstFit {
 public:
  FirstFit(size_t max_bins, long long budget) {
    size_ = 1;
    while (size_ < max_bins) size_ <<= 1;
    room_.assign(2 * size_, budget);
  }
  size_t find(long long need) const {
    size_t node = 1;
    while (node < size_) node = room_[2 * node] >= need ? 2 * node : 2 * node + 1;
    return node - size_;
  }
  void take(size_t bin, long long tokens) {
    size_t node = bin + size_;
    room_[node] -= tokens;
    for (node >>= 1; node >= 1; node >>= 1) {
      const long long most = std::max(room_[2 * node], room_[2 * node + 1]);
      if (room_[node] == most) break;  // unchanged here, so unchanged above
      room_[node] = most;
    }
  }

 private:
  size_t size_;
  std::vector<long long> room_;
};

using MicroBatches = std::vector<std::vector<long long>>;

MicroBatches pack_rank(const Inputs& in, const std::vector<long long>& members) {
  // Longest first, equal lengths by index: the twin's sort key (-L, i), a total order. The
  // key sits next to the index so the sort does not chase in.length (cache misses).
  std::vector<std::pair<long long, long long>> samples(members.size());
  for (size_t s = 0; s < members.size(); ++s) samples[s] = {-in.length[members[s]], members[s]};
  std::sort(samples.begin(), samples.end());
  MicroBatches bins;
  std::vector<double> bin_cost;
  if (!samples.empty()) {
    FirstFit first_fit(samples.size(), in.budget);
    for (const auto& sample : samples) {
      const long long i = sample.second;
      const size_t bin = first_fit.find(in.length[i]);
      if (bin == bins.size()) {
        bins.emplace_back();
        bin_cost.push_back(0.0);
      }
      bins[bin].push_back(i);
      bin_cost[bin] += in.cost[i];
      first_fit.take(bin, in.length[i]);
    }
  }
  // Heaviest micro-batch first on every rank, so that the j-th micro-batches, which run in
  // lockstep across ranks, are alike (stable: ties keep their opening order).
  std::vector<size_t> order(bins.size());
  for (size_t j = 0; j < order.size(); ++j) order[j] = j;
  std::stable_sort(order.begin(), order.end(),
                   [&bin_cost](size_t p, size_t q) { return bin_cost[p] > bin_cost[q]; });
  MicroBatches sorted;
  sorted.reserve(bins.size());
  for (const size_t j : order) sorted.push_back(std::move(bins[j]));
  return sorted;
}

std::vector<MicroBatches> plan(const Inputs& in) {
  std::vector<long long> next_group;
  const std::vector<long long> rank_head = KarmarkarKarp(in).assign(&next_group);
  std::vector<MicroBatches> per_rank(in.ranks);
  for (long long r = 0; r < in.ranks; ++r) {
    std::vector<long long> samples;
    for (long long g = rank_head[r]; g >= 0; g = next_group[g])
      for (long long m = in.group_start[g]; m < in.group_start[g + 1]; ++m)
        samples.push_back(in.group_member[m]);
    per_rank[r] = pack_rank(in, samples);
  }
  return per_rank;
}

// ---------------------------------------------------------------------------------------
// Output: list[rank][micro-batch][sample], every rank padded with empty micro-batches to
// the same count (FSDP collectives must line up across ranks).

PyObject* to_python(const std::vector<MicroBatches>& per_rank) {
  size_t count = 0;
  for (const MicroBatches& mbs : per_rank) count = std::max(count, mbs.size());
  Ref ranks(PyList_New(static_cast<Py_ssize_t>(per_rank.size())));
  if (!ranks.p) return nullptr;
  for (size_t r = 0; r < per_rank.size(); ++r) {
    PyObject* mbs = PyList_New(static_cast<Py_ssize_t>(count));
    if (!mbs) return nullptr;
    PyList_SET_ITEM(ranks.p, r, mbs);  // steals; filled below
    for (size_t j = 0; j < count; ++j) {
      const size_t size = j < per_rank[r].size() ? per_rank[r][j].size() : 0;
      PyObject* mb = PyList_New(static_cast<Py_ssize_t>(size));
      if (!mb) return nullptr;
      PyList_SET_ITEM(mbs, j, mb);
      for (size_t s = 0; s < size; ++s) {
        PyObject* index = PyLong_FromLongLong(per_rank[r][j][s]);
        if (!index) return nullptr;
        PyList_SET_ITEM(mb, s, index);
      }
    }
  }
  PyObject* out = ranks.p;
  ranks.p = nullptr;
  return out;
}

}  // namespace

PyObject* plan_micro_batches(PyObject* /*self*/, PyObject* args) {
  try {
    Inputs in;
    if (!read_inputs(args, &in)) return nullptr;
    std::vector<MicroBatches> per_rank;
    bool out_of_memory = false;
    Py_BEGIN_ALLOW_THREADS  // pure C++ from here to the output: other threads may run
    try {
      per_rank = plan(in);
    } catch (const std::bad_alloc&) {
      out_of_memory = true;
    }
    Py_END_ALLOW_THREADS
    if (out_of_memory) return PyErr_NoMemory();
    return to_python(per_rank);
  } catch (const std::bad_alloc&) {
    return PyErr_NoMemory();
  }
}

}  // namespace staged
