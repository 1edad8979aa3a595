// The extension module staged._C: module init and the one method table, nothing else.
//
// Each host-side routine lives in its own .cpp with a header that declares its entry point
// (a PyCFunction) and its docstring. To add one (say a span-table builder): write
// csrc/span_table.{h,cpp}, include the header here and add a row to kMethods. setup.py
// compiles every csrc/*.cpp into this one module.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "planner.h"
#include "span_table.h"

namespace {

PyMethodDef kMethods[] = {
    {"plan_micro_batches", staged::plan_micro_batches, METH_VARARGS,
     staged::kPlanMicroBatchesDoc},
    {"build_span_tables", staged::build_span_tables, METH_VARARGS, staged::kBuildSpanTablesDoc},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef kModule = {
    PyModuleDef_HEAD_INIT,
    "staged._C",
    "Host-side C++ for the staged data path (raw CPython API). Each function has a pure-Python "
    "twin that gives identical results; see staged.packing.",
    -1,        // no per-module state
    kMethods,
    nullptr,   // m_slots
    nullptr,   // m_traverse
    nullptr,   // m_clear
    nullptr,   // m_free
};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }
