// Span tables of packed micro-batches: the entry point csrc/module.cpp puts in the method table
// of staged._C. Raw CPython API only (no pybind11, no torch headers). The pure-Python twin is
// staged/packing/spans.py::build_python; the format is documented there.
#pragma once

#define PY_SSIZE_T_CLEAN
#include <Python.h>

namespace staged {

// build_span_tables(micro_batches, seq_lens, prompt_lens, vision_ptr, vision_offsets,
//                   vision_kinds, vision_grids, vision_seconds, spatial_merge_size,
//                   tokens_per_second, rope, advance, pad_multiple)
//   -> list of (spans, time_scale, cu_seqlens, sample_index, prompt_lens, rope_deltas,
//               vision_spans, num_rows, max_seqlen, num_vision_rows), one per micro-batch;
//      the first seven are bytearrays of native int64 / float32 / int32 values.
PyObject* build_span_tables(PyObject* self, PyObject* args);
extern const char kBuildSpanTablesDoc[];

}  // namespace staged
