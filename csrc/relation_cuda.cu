// CUDA registrations of the rga_kernels ops. The math is the device-generic code of relation.h:
// its GEMMs run as cuBLAS calls on the current stream through ATen, with fp32 accumulation.
// Compiled only when the extension is built with CUDA (see setup.py).
#include <torch/library.h>

#include "relation.h"

TORCH_LIBRARY_IMPL(rga_kernels, CUDA, m) {
  m.impl("relation_fwd", &rga_kernels::relation_fwd);
  m.impl("relation_bwd", &rga_kernels::relation_bwd);
}
