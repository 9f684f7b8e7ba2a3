// Op schemas of the rga_kernels library and their CPU implementations.
// Fake (meta) kernels and autograd are registered from Python (rga_kernels/ops.py).
#include <Python.h>
#include <torch/library.h>

#include "relation.h"

// Importing rga_kernels._C loads this library, which runs the registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(rga_kernels, m) {
  m.def("relation_fwd(Tensor theta, Tensor phi, Tensor weight) -> (Tensor, Tensor, Tensor)");
  m.def(
      "relation_bwd(Tensor grad_out, Tensor theta, Tensor phi, Tensor weight, Tensor pt, "
      "Tensor qt) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rga_kernels, CPU, m) {
  m.impl("relation_fwd", &rga_kernels::relation_fwd);
  m.impl("relation_bwd", &rga_kernels::relation_bwd);
}
