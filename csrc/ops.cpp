// Every op's schema, once. The emulated-CUDA test build compiles this same
// file with CAE_NAMESPACE=cae_sim so that its ops have identical schemas.
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(CAE_NAMESPACE, m) {
  // relu: fuse max(0, .) into the output. relu_output: the forward output of
  // such an op; gradients pass only where it is positive.
  m.def("conv3x3(Tensor input, Tensor weight, Tensor? bias, int stride, bool relu) -> Tensor");
  m.def("conv3x3_grad_input(Tensor grad_output, Tensor? relu_output, Tensor weight, Tensor input, int stride) -> Tensor");
  m.def("conv3x3_grad_weight(Tensor grad_output, Tensor? relu_output, Tensor input, int stride) -> (Tensor, Tensor)");
  m.def("conv_transpose3x3(Tensor input, Tensor weight, Tensor? bias, int stride, bool relu) -> Tensor");
  m.def("conv_transpose3x3_grad_input(Tensor grad_output, Tensor? relu_output, Tensor weight, Tensor input, int stride) -> Tensor");
  m.def("conv_transpose3x3_grad_weight(Tensor grad_output, Tensor? relu_output, Tensor input, int stride) -> (Tensor, Tensor)");
  m.def("bias_grad(Tensor grad_output, Tensor? relu_output) -> Tensor");
  m.def("max_pool2x2(Tensor input) -> Tensor");
  m.def("max_pool2x2_grad_input(Tensor grad_output, Tensor input) -> Tensor");
}

#if !defined(CAE_WITH_CUDA) && !defined(CAE_SIM)
namespace {
// Without this, a CUDA tensor would meet the dispatcher's generic "could not
// run ... with arguments from the 'CUDA' backend".
void cuda_not_built(const c10::OperatorHandle& op, torch::jit::Stack*) {
  TORCH_CHECK(false, "cae: ", op.schema().name(),
              " got a CUDA tensor, but cae_kernels was built without CUDA "
              "kernels; reinstall it with a CUDA toolkit and a CUDA build of "
              "torch (FORCE_CUDA=1 makes a missing toolkit a build error)");
}
}  // namespace

TORCH_LIBRARY_IMPL(CAE_NAMESPACE, CUDA, m) {
  for (const char* name : cae::kOpNames) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&cuda_not_built>());
  }
}
#endif

#ifndef CAE_SIM
// Importing cae_kernels._C loads the library, which registers the ops.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
#ifdef CAE_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  PyObject* m = PyModule_Create(&module);
  if (m != nullptr && PyModule_AddIntConstant(m, "with_cuda", with_cuda) != 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
#endif
