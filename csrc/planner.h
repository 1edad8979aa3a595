// Packing planner: the entry point csrc/module.cpp puts in the method table of staged._C.
// Raw CPython API only (no pybind11, no torch headers) so the extension builds with nothing
// but a C++ compiler. The pure-Python twin is staged/packing/planner.py::plan_python.
#pragma once

#define PY_SSIZE_T_CLEAN
#include <Python.h>

namespace staged {

// plan_micro_batches(lengths, group_ids, vision_patches, token_budget, num_ranks,
//                    cost_a, cost_b, cost_vision) -> list[rank][micro-batch][sample index]
PyObject* plan_micro_batches(PyObject* self, PyObject* args);
extern const char kPlanMicroBatchesDoc[];

}  // namespace staged
