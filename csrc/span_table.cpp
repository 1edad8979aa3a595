// Span tables of packed micro-batches: for each micro-batch, its spans (text runs and vision
// spans with their LLM grid and mrope position base), cu_seqlens, max_seqlen, per-sample
// prompt lengths and mrope deltas, and the order of its vision features. Built from sizes the
// host knows at collate time, in O(samples + spans). The format, the position rules and the
// padding rules are documented on the Python side (staged/packing/spans.py); its pure-Python
// twin `build_python` there must give IDENTICAL output and IDENTICAL ValueError messages:
// change both or neither (tests/packing/test_spans.py compares them on random inputs).
//
// Bit-exactness with Python: the only floating-point values are float32 time scales and the
// float32 product (float)i * scale, one IEEE rounding each, as Python's struct 'f' packing
// rounds them; no fused multiply-add can occur (hence the pragma, for safety).
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#elif defined(_MSC_VER)
#pragma fp_contract(off)
#endif

#include "span_table.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <new>
#include <vector>

namespace staged {

const char kBuildSpanTablesDoc[] =
    "build_span_tables(micro_batches, seq_lens, prompt_lens, vision_ptr, vision_offsets,\n"
    "                  vision_kinds, vision_grids, vision_seconds, spatial_merge_size,\n"
    "                  tokens_per_second, rope, advance, pad_multiple) -> list[tuple]\n"
    "\n"
    "C++ span-table builder (all arguments positional; vision_seconds may be None).\n"
    "Use staged.packing.spans.build_span_tables, which documents it and wraps the result.";

namespace {

constexpr long long kMaxCount = 2147483647LL;  // tokens, rows (cu_seqlens is int32), grid sizes
constexpr double kMaxRate = 1e6;               // tokens_per_second and seconds per grid step
constexpr int kFields = 9;
constexpr long long kText = 0, kImage = 1, kVideo = 2;

// Holds one reference; releases it on every exit path.
struct Ref {
  PyObject* p = nullptr;
  explicit Ref(PyObject* obj) : p(obj) {}
  Ref(const Ref&) = delete;
  Ref& operator=(const Ref&) = delete;
  ~Ref() { Py_XDECREF(p); }
};

// An integer read through __index__: its value clamped to long long (overflow reads as
// LLONG_MIN / LLONG_MAX, which every range check rejects) and the index object itself, for
// error messages that print it exactly as Python does.
struct Int {
  long long v = 0;
  Ref obj{nullptr};
};

bool read_int(PyObject* item, Int* out) {
  out->obj.p = PyNumber_Index(item);
  if (!out->obj.p) return false;
  int overflow = 0;
  out->v = PyLong_AsLongLongAndOverflow(out->obj.p, &overflow);
  if (out->v == -1 && overflow == 0 && PyErr_Occurred()) return false;
  if (overflow) out->v = overflow > 0 ? LLONG_MAX : LLONG_MIN;
  return true;
}

// A plain long long from an int whose range is checked by the caller (value already in range).
bool read_ll(PyObject* item, long long* out) {
  Int x;
  if (!read_int(item, &x)) return false;
  *out = x.v;
  return true;
}

float scaled_time(long long i, float scale) {
  return static_cast<float>(i) * scale;  // one float32 rounding, as in Python's scaled_time
}

PyObject* float_repr_arg(double x) { return PyFloat_FromDouble(x); }

struct MicroBatchOut {
  std::vector<long long> spans;
  std::vector<float> scales;
  std::vector<int32_t> cu;
  std::vector<long long> index;
  std::vector<int32_t> prompts;
  std::vector<long long> deltas;
  std::vector<long long> vspans;
  long long rows = 0, max_len = 0, vrows = 0;
};

PyObject* bytes_of(const void* data, size_t size) {
  return PyByteArray_FromStringAndSize(static_cast<const char*>(data),
                                       static_cast<Py_ssize_t>(size));
}

template <class T>
PyObject* bytes_of(const std::vector<T>& v) {
  return bytes_of(v.data(), v.size() * sizeof(T));
}

}  // namespace

PyObject* build_span_tables(PyObject* /*self*/, PyObject* args) {
  try {
    PyObject *mbs_obj, *lens_obj, *prompts_obj, *ptr_obj, *off_obj, *kind_obj, *grid_obj,
        *sec_obj, *merge_obj, *rope_obj, *adv_obj, *pad_obj;
    double tps;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOdOOO:build_span_tables", &mbs_obj, &lens_obj,
                          &prompts_obj, &ptr_obj, &off_obj, &kind_obj, &grid_obj, &sec_obj,
                          &merge_obj, &tps, &rope_obj, &adv_obj, &pad_obj))
      return nullptr;

    // ---- scalars
    Int merge_i;
    if (!read_int(merge_obj, &merge_i)) return nullptr;
    if (merge_i.v < 1 || merge_i.v > kMaxCount) {
      PyErr_Format(PyExc_ValueError, "spatial_merge_size must be in [1, 2147483647], got %S",
                   merge_i.obj.p);
      return nullptr;
    }
    const long long m = merge_i.v;
    if (!(tps >= 0.0 && tps <= kMaxRate)) {
      Ref value(float_repr_arg(tps));
      if (value.p)
        PyErr_Format(PyExc_ValueError,
                     "tokens_per_second must be a finite number in [0, 1e6], got %R", value.p);
      return nullptr;
    }
    Int rope_i, adv_i, pad_i;
    if (!read_int(rope_obj, &rope_i)) return nullptr;
    if (rope_i.v < 0 || rope_i.v > 2) {
      PyErr_Format(PyExc_ValueError,
                   "rope must be 0 (qwen2_vl), 1 (qwen2_5_vl) or 2 (qwen3_vl), got %S",
                   rope_i.obj.p);
      return nullptr;
    }
    const long long rope = rope_i.v;
    if (!read_int(adv_obj, &adv_i)) return nullptr;
    if (adv_i.v < 0 || adv_i.v > 1) {
      PyErr_Format(PyExc_ValueError, "advance must be 0 (spatial) or 1 (max), got %S",
                   adv_i.obj.p);
      return nullptr;
    }
    const long long advance = adv_i.v;
    if (!read_int(pad_obj, &pad_i)) return nullptr;
    if (pad_i.v < 1 || pad_i.v > kMaxCount) {
      PyErr_Format(PyExc_ValueError, "pad_multiple must be in [1, 2147483647], got %S",
                   pad_i.obj.p);
      return nullptr;
    }
    const long long pad = pad_i.v;

    // ---- sequences, as tuples (Python code run by __index__ cannot resize them)
    Ref lens(PySequence_Tuple(lens_obj));
    if (!lens.p) return nullptr;
    Ref prompts(PySequence_Tuple(prompts_obj));
    if (!prompts.p) return nullptr;
    Ref ptrs(PySequence_Tuple(ptr_obj));
    if (!ptrs.p) return nullptr;
    Ref offs(PySequence_Tuple(off_obj));
    if (!offs.p) return nullptr;
    Ref kinds(PySequence_Tuple(kind_obj));
    if (!kinds.p) return nullptr;
    Ref grids(PySequence_Tuple(grid_obj));
    if (!grids.p) return nullptr;
    const Py_ssize_t n = PyTuple_GET_SIZE(lens.p);
    const Py_ssize_t V = PyTuple_GET_SIZE(offs.p);
    if (PyTuple_GET_SIZE(prompts.p) != n) {
      PyErr_Format(PyExc_ValueError, "prompt_lens has %zd entries but seq_lens has %zd",
                   PyTuple_GET_SIZE(prompts.p), n);
      return nullptr;
    }
    if (PyTuple_GET_SIZE(ptrs.p) != n + 1) {
      PyErr_Format(PyExc_ValueError,
                   "vision_ptr has %zd entries but needs len(seq_lens) + 1 = %zd (CSR offsets "
                   "into the vision spans)",
                   PyTuple_GET_SIZE(ptrs.p), n + 1);
      return nullptr;
    }
    if (PyTuple_GET_SIZE(kinds.p) != V) {
      PyErr_Format(PyExc_ValueError, "vision_kinds has %zd entries but vision_offsets has %zd",
                   PyTuple_GET_SIZE(kinds.p), V);
      return nullptr;
    }
    if (PyTuple_GET_SIZE(grids.p) != 3 * V) {
      PyErr_Format(PyExc_ValueError,
                   "vision_grids has %zd entries but needs 3 * %zd = %zd (t, h, w per vision "
                   "span)",
                   PyTuple_GET_SIZE(grids.p), V, 3 * V);
      return nullptr;
    }
    Ref secs(sec_obj == Py_None ? nullptr : PySequence_Tuple(sec_obj));
    if (sec_obj != Py_None) {
      if (!secs.p) return nullptr;
      if (PyTuple_GET_SIZE(secs.p) != V) {
        PyErr_Format(PyExc_ValueError, "vision_seconds has %zd entries but vision_offsets has %zd",
                     PyTuple_GET_SIZE(secs.p), V);
        return nullptr;
      }
    }
    const float tps32 = static_cast<float>(tps);

    // ---- per sample, in index order
    std::vector<long long> length(n), prompt(n), ptr(n + 1, 0);
    std::vector<long long> v_off(V), v_kind(V), v_t(V), v_h(V), v_w(V);
    std::vector<float> v_scale(V, 1.0f);
    {
      Int p0;
      if (!read_int(PyTuple_GET_ITEM(ptrs.p, 0), &p0)) return nullptr;
      if (p0.v != 0) {
        PyErr_Format(PyExc_ValueError, "vision_ptr[0] must be 0, got %S", p0.obj.p);
        return nullptr;
      }
    }
    for (Py_ssize_t i = 0; i < n; ++i) {
      Int L, P, end;
      if (!read_int(PyTuple_GET_ITEM(lens.p, i), &L)) return nullptr;
      if (L.v < 0 || L.v > kMaxCount) {
        PyErr_Format(PyExc_ValueError,
                     "seq_lens[%zd] is %S: token counts must be in [0, 2147483647]", i, L.obj.p);
        return nullptr;
      }
      if (!read_int(PyTuple_GET_ITEM(prompts.p, i), &P)) return nullptr;
      if (P.v < 0 || P.v > L.v) {
        PyErr_Format(PyExc_ValueError, "prompt_lens[%zd] is %S but sample %zd has %lld tokens",
                     i, P.obj.p, i, L.v);
        return nullptr;
      }
      length[i] = L.v;
      prompt[i] = P.v;
      if (!read_int(PyTuple_GET_ITEM(ptrs.p, i + 1), &end)) return nullptr;
      if (end.v < ptr[i] || end.v > V) {
        PyErr_Format(PyExc_ValueError,
                     "vision_ptr[%zd] is %S: must be in [vision_ptr[%zd] = %lld, %zd]", i + 1,
                     end.obj.p, i, ptr[i], V);
        return nullptr;
      }
      ptr[i + 1] = end.v;
      long long previous_end = 0;
      for (long long j = ptr[i]; j < end.v; ++j) {
        Int o, k, t, h, w;
        if (!read_int(PyTuple_GET_ITEM(offs.p, j), &o) ||
            !read_int(PyTuple_GET_ITEM(kinds.p, j), &k) ||
            !read_int(PyTuple_GET_ITEM(grids.p, 3 * j), &t) ||
            !read_int(PyTuple_GET_ITEM(grids.p, 3 * j + 1), &h) ||
            !read_int(PyTuple_GET_ITEM(grids.p, 3 * j + 2), &w))
          return nullptr;
        if (k.v != kImage && k.v != kVideo) {
          PyErr_Format(PyExc_ValueError,
                       "vision span %lld (sample %zd) has kind %S: must be 1 (image) or 2 (video)",
                       j, i, k.obj.p);
          return nullptr;
        }
        if (!(t.v >= 1 && t.v <= kMaxCount && h.v >= 1 && h.v <= kMaxCount && w.v >= 1 &&
              w.v <= kMaxCount && h.v % m == 0 && w.v % m == 0)) {
          PyErr_Format(PyExc_ValueError,
                       "vision span %lld (sample %zd) has grid (%S, %S, %S): sizes must be in "
                       "[1, 2147483647] and h, w divisible by spatial_merge_size=%lld",
                       j, i, t.obj.p, h.obj.p, w.obj.p, m);
          return nullptr;
        }
        if (rope == 2 && k.v == kVideo && t.v != 1) {
          PyErr_Format(PyExc_ValueError,
                       "vision span %lld (sample %zd): qwen3_vl video spans are single frames "
                       "(t=1, one span per frame between timestamp tokens), got t=%lld",
                       j, i, t.v);
          return nullptr;
        }
        if (o.v < previous_end) {
          PyErr_Format(PyExc_ValueError,
                       "vision span %lld (sample %zd) starts at offset %S, before the end of the "
                       "previous vision span or the sample start (%lld)",
                       j, i, o.obj.p, previous_end);
          return nullptr;
        }
        const long long hm = h.v / m, wm = w.v / m;
        const long long th = t.v * hm;  // <= 2^62: no overflow
        if (o.v > L.v || th > L.v - o.v || th * wm > L.v - o.v) {
          PyErr_Format(PyExc_ValueError,
                       "vision span %lld (sample %zd) at offset %S with grid (%lld, %lld, %lld) "
                       "does not fit in the sample's %lld tokens",
                       j, i, o.obj.p, t.v, h.v, w.v, L.v);
          return nullptr;
        }
        float scale = 1.0f;
        if (secs.p) {
          const double s = PyFloat_AsDouble(PyTuple_GET_ITEM(secs.p, j));
          if (s == -1.0 && PyErr_Occurred()) return nullptr;
          if (!(s >= 0.0 && s <= kMaxRate)) {
            Ref value(float_repr_arg(s));
            if (value.p)
              PyErr_Format(PyExc_ValueError,
                           "vision_seconds[%lld] is %R: must be a finite number in [0, 1e6]", j,
                           value.p);
            return nullptr;
          }
          if (rope == 1 && k.v == kVideo) scale = tps32 * static_cast<float>(s);
        } else if (rope == 1 && k.v == kVideo) {
          scale = tps32;
        }
        const float last = scaled_time(t.v - 1, scale);
        if (static_cast<double>(last) > static_cast<double>(kMaxCount)) {
          Ref value(PyLong_FromDouble(static_cast<double>(last)));
          if (value.p)
            PyErr_Format(PyExc_ValueError,
                         "vision span %lld (sample %zd): its last time position offset %S "
                         "exceeds 2147483647",
                         j, i, value.p);
          return nullptr;
        }
        previous_end = o.v + th * wm;
        v_off[j] = o.v;
        v_kind[j] = k.v;
        v_t[j] = t.v;
        v_h[j] = hm;
        v_w[j] = wm;
        v_scale[j] = scale;
      }
    }

    // ---- micro-batches: indices in range, each sample at most once
    Ref mbs(PySequence_Tuple(mbs_obj));
    if (!mbs.p) return nullptr;
    const Py_ssize_t num_mb = PyTuple_GET_SIZE(mbs.p);
    std::vector<std::vector<long long>> members(num_mb);
    std::vector<char> seen(n, 0);
    for (Py_ssize_t b = 0; b < num_mb; ++b) {
      Ref mb(PySequence_Tuple(PyTuple_GET_ITEM(mbs.p, b)));
      if (!mb.p) return nullptr;
      const Py_ssize_t size = PyTuple_GET_SIZE(mb.p);
      members[b].reserve(size);
      for (Py_ssize_t q = 0; q < size; ++q) {
        Int x;
        if (!read_int(PyTuple_GET_ITEM(mb.p, q), &x)) return nullptr;
        if (x.v < 0 || x.v >= n) {
          PyErr_Format(PyExc_ValueError,
                       "micro_batches[%zd] holds sample %S, but there are only %zd samples", b,
                       x.obj.p, n);
          return nullptr;
        }
        if (seen[x.v]) {
          PyErr_Format(PyExc_ValueError, "sample %lld appears twice (again in micro_batches[%zd])",
                       x.v, b);
          return nullptr;
        }
        seen[x.v] = 1;
        members[b].push_back(x.v);
      }
    }

    // ---- build (pure C++, no Python objects touched)
    std::vector<MicroBatchOut> outs(num_mb);
    Py_ssize_t too_big = -1;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t b = 0; b < num_mb && too_big < 0; ++b) {
      MicroBatchOut& o = outs[b];
      o.cu.push_back(0);
      long long row = 0, vrow = 0, max_len = 0;
      auto add_span = [&](long long slot, long long kind, long long r, long long len,
                          long long pos, long long t, long long h, long long w, long long vr,
                          float scale) {
        const long long f[kFields] = {slot, kind, r, len, pos, t, h, w, vr};
        o.spans.insert(o.spans.end(), f, f + kFields);
        o.scales.push_back(scale);
      };
      const std::vector<long long>& mb = members[b];
      for (size_t slot = 0; slot < mb.size(); ++slot) {
        const long long i = mb[slot];
        const long long L = length[i];
        if (row + L > kMaxCount) {
          too_big = b;
          break;
        }
        long long pos = 0, top = -1, cursor = 0;
        for (long long j = ptr[i]; j < ptr[i + 1]; ++j) {
          const long long off = v_off[j];
          if (off > cursor) {
            add_span(slot, kText, row + cursor, off - cursor, pos, 0, 0, 0, -1, 1.0f);
            pos += off - cursor;
            top = std::max(top, pos - 1);
          }
          const long long t = v_t[j], h = v_h[j], w = v_w[j];
          const long long n_rows = t * h * w;
          add_span(slot, v_kind[j], row + off, n_rows, pos, t, h, w, vrow, v_scale[j]);
          o.vspans.push_back(j);
          vrow += n_rows;
          const long long last = std::max(
              {pos + static_cast<long long>(scaled_time(t - 1, v_scale[j])), pos + h - 1,
               pos + w - 1});
          top = std::max(top, last);
          pos = advance == 0 ? pos + std::max(h, w) : top + 1;
          cursor = off + n_rows;
        }
        if (L > cursor) {
          add_span(slot, kText, row + cursor, L - cursor, pos, 0, 0, 0, -1, 1.0f);
          top = std::max(top, pos + L - cursor - 1);
        }
        row += L;
        o.cu.push_back(static_cast<int32_t>(row));
        o.index.push_back(i);
        o.prompts.push_back(static_cast<int32_t>(prompt[i]));
        o.deltas.push_back(L > 0 ? top + 1 - L : 0);
        max_len = std::max(max_len, L);
      }
      if (too_big >= 0) break;
      const long long target = (std::max(row, 1LL) + pad - 1) / pad * pad;
      if (target > kMaxCount) {
        too_big = b;
        break;
      }
      if (target > row) {
        const long long L = target - row;
        add_span(static_cast<long long>(o.index.size()), kText, row, L, 0, 0, 0, 0, -1, 1.0f);
        row = target;
        o.cu.push_back(static_cast<int32_t>(row));
        o.index.push_back(-1);
        o.prompts.push_back(static_cast<int32_t>(L));
        o.deltas.push_back(0);
        max_len = std::max(max_len, L);
      }
      o.rows = row;
      o.max_len = max_len;
      o.vrows = vrow;
    }
    Py_END_ALLOW_THREADS
    if (too_big >= 0) {
      PyErr_Format(PyExc_ValueError,
                   "micro_batches[%zd] holds more than 2147483647 tokens: cu_seqlens is int32",
                   too_big);
      return nullptr;
    }

    // ---- to Python
    Ref result(PyList_New(num_mb));
    if (!result.p) return nullptr;
    for (Py_ssize_t b = 0; b < num_mb; ++b) {
      const MicroBatchOut& o = outs[b];
      PyObject* item = Py_BuildValue(
          "(NNNNNNNLLL)", bytes_of(o.spans), bytes_of(o.scales), bytes_of(o.cu),
          bytes_of(o.index), bytes_of(o.prompts), bytes_of(o.deltas), bytes_of(o.vspans),
          o.rows, o.max_len, o.vrows);
      if (!item) return nullptr;
      PyList_SET_ITEM(result.p, b, item);
    }
    PyObject* out = result.p;
    result.p = nullptr;
    return out;
  } catch (const std::bad_alloc&) {
    return PyErr_NoMemory();
  }
}

}  // namespace staged
