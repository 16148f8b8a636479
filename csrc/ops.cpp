// Every op's schema, once. The emulated-CUDA test build compiles this same
// file with CAE_NAMESPACE=cae_sim so that its ops have identical schemas.
#include <Python.h>
#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(CAE_NAMESPACE, m) {
  // relu: fuse max(0, .) into the output. relu_output: the forward output of
  // such an op; gradients pass only where it is positive.
  m.def("conv3x3(Tensor input, Tensor weight, Tensor? bias, int stride, bool relu) -> Tensor");
  m.def(
      "conv3x3_grad_input(Tensor grad_output, Tensor? relu_output, Tensor weight, Tensor input, int stride) "
      "-> Tensor");
  m.def(
      "conv3x3_grad_weight(Tensor grad_output, Tensor? relu_output, Tensor input, int stride) -> (Tensor, "
      "Tensor)");
  m.def("conv_transpose3x3(Tensor input, Tensor weight, Tensor? bias, int stride, bool relu) -> Tensor");
  m.def(
      "conv_transpose3x3_grad_input(Tensor grad_output, Tensor? relu_output, Tensor weight, Tensor input, "
      "int stride) -> Tensor");
  m.def(
      "conv_transpose3x3_grad_weight(Tensor grad_output, Tensor? relu_output, Tensor input, int stride) -> "
      "(Tensor, Tensor)");
  // The three gradients at once (grad_input, grad_weight, grad_bias): autograd's
  // choice when it needs the input's and the weight's.
  m.def(
      "conv3x3_backward(Tensor grad_output, Tensor? relu_output, Tensor weight, Tensor input, int stride) -> "
      "(Tensor, Tensor, Tensor)");
  m.def(
      "conv_transpose3x3_backward(Tensor grad_output, Tensor? relu_output, Tensor weight, Tensor input, "
      "int stride) -> (Tensor, Tensor, Tensor)");
  m.def("bias_grad(Tensor grad_output, Tensor? relu_output) -> Tensor");
  m.def("max_pool2x2(Tensor input) -> Tensor");
  m.def("max_pool2x2_grad_input(Tensor grad_output, Tensor input) -> Tensor");
  // Blocks (ops.h): an encoder block, weights [w1, w2] (then a 2x2 max-pool)
  // or [w1, w2, w_down] (then a stride-2 convolution), a bias per weight; a
  // decoder block, stride-2 transposed convolutions then a linear stride-1
  // one, center-cropped to output_size. The backward ops recompute the
  // interior from the block's input and return (grad_input, grad_weights,
  // grad_biases); without input_grad, grad_input is an empty tensor.
  // The encoder block returns its output and the pool's winner codes (uint8,
  // the output's sizes; empty for the strided block), which its backward
  // takes to skip recomputing a2.
  m.def("encoder_block(Tensor input, Tensor[] weights, Tensor[] biases, bool relu) -> (Tensor, Tensor)");
  m.def(
      "encoder_block_backward(Tensor grad_output, Tensor input, Tensor? output, Tensor? winners, Tensor[] "
      "weights, Tensor[] biases, bool relu, bool input_grad) -> (Tensor, Tensor[], Tensor[])");
  m.def(
      "decoder_block(Tensor input, Tensor[] weights, Tensor[] biases, bool relu, SymInt[] output_size) -> "
      "Tensor");
  m.def(
      "decoder_block_backward(Tensor grad_output, Tensor input, Tensor[] weights, Tensor[] biases, "
      "bool relu, SymInt[] output_size, bool input_grad) -> (Tensor, Tensor[], Tensor[])");
  // The decoder block and the loss of its output against target (whose size
  // is the crop's) in one op: (logits, loss, rmse), the loss and the RMSE as
  // sigmoid_cross_entropy's, in the block's accumulation dtype (the target's
  // too). The backward takes the loss's gradient and, where the logits have
  // one of their own, grad_output.
  m.def(
      "decoder_block_loss(Tensor input, Tensor[] weights, Tensor[] biases, bool relu, Tensor target) -> "
      "(Tensor, Tensor, Tensor)");
  m.def(
      "decoder_block_loss_backward(Tensor grad_loss, Tensor? grad_output, Tensor logits, Tensor target, "
      "Tensor input, Tensor[] weights, Tensor[] biases, bool relu, bool input_grad) -> "
      "(Tensor, Tensor[], Tensor[])");
  // The loss (ops.h): (mean binary cross-entropy on logits, RMSE of their
  // sigmoid) against a target of the logits' sizes; the backward, the logits'
  // gradient from the loss's.
  m.def("sigmoid_cross_entropy(Tensor logits, Tensor target) -> (Tensor, Tensor)");
  m.def("sigmoid_cross_entropy_backward(Tensor grad_loss, Tensor logits, Tensor target) -> Tensor");
  // Adam's step over parameter lists (ops.h adam_), in place; returns the
  // gradients' 2-norm.
  m.def(
      "adam_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] steps, Tensor lr, float beta1, float beta2, float eps, float weight_decay) -> Tensor");
}

// Autocast: the convolutions and the blocks run in the autocast region's lower precision
// (float16 or bfloat16, computed with float32 accumulation), as PyTorch's own
// convolutions do; max-pool keeps its input's dtype (the autocast keys fall
// through for it). The CUDA kernels serve cae on CUDA tensors; the emulated
// ones (cae_sim) run on CPU tensors, so theirs is the CPU's autocast, which
// is how the tests check this without a GPU. The CPU kernels (float32 and
// float64 only) are left out of CPU autocast.
namespace {
#ifdef CAE_SIM
constexpr c10::DeviceType kAutocastDevice = c10::DeviceType::CPU;
#define CAE_AUTOCAST_KEY AutocastCPU
#else
constexpr c10::DeviceType kAutocastDevice = c10::DeviceType::CUDA;
#define CAE_AUTOCAST_KEY AutocastCUDA
#endif
#define CAE_STRINGIFY(x) #x
#define CAE_OP_NAME(ns, op) CAE_STRINGIFY(ns) "::" op

// The autocast kernel of the op `name` (signature R(Args...)): its tensors
// (lists and optional ones too) cast to the region's lower precision (or, for
// the loss, to float32, as autocast runs PyTorch's), the other arguments as
// they are, then the op below autocast.
template <const char* name, class Signature, bool float32 = false>
struct Autocast;
template <const char* name, class R, class... Args, bool float32>
struct Autocast<name, R(Args...), float32> {
  static R call(Args... args) {
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow((CAE_OP_NAME(CAE_NAMESPACE, "") + std::string(name)).c_str(), "")
            .typed<R(Args...)>();
    c10::impl::ExcludeDispatchKeyGuard no_autocast(
        at::autocast::get_autocast_dispatch_key_from_device_type(kAutocastDevice));
    const auto dtype =
        float32 ? at::kFloat : at::autocast::get_lower_precision_fp_from_device_type(kAutocastDevice);
    return op.call(at::autocast::cached_cast(dtype, args, kAutocastDevice)...);
  }
};
using ConvSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                 int64_t, bool);
using EncoderBlockSignature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, at::TensorList,
                                                                 at::TensorList, bool);
using DecoderBlockSignature = at::Tensor(const at::Tensor&, at::TensorList, at::TensorList, bool,
                                         c10::SymIntArrayRef);
constexpr char kConv3x3[] = "conv3x3";
constexpr char kConvTranspose3x3[] = "conv_transpose3x3";
constexpr char kEncoderBlock[] = "encoder_block";
constexpr char kDecoderBlock[] = "decoder_block";
constexpr char kLoss[] = "sigmoid_cross_entropy";
using LossSignature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&);

// The block in the lower precision, the target (and so the loss) in float32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> decoder_block_loss_autocast(const at::Tensor& input,
                                                                           at::TensorList weights,
                                                                           at::TensorList biases, bool relu,
                                                                           const at::Tensor& target) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow(CAE_OP_NAME(CAE_NAMESPACE, "decoder_block_loss"), "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, at::TensorList,
                                                                at::TensorList, bool, const at::Tensor&)>();
  c10::impl::ExcludeDispatchKeyGuard no_autocast(
      at::autocast::get_autocast_dispatch_key_from_device_type(kAutocastDevice));
  const auto lower = at::autocast::get_lower_precision_fp_from_device_type(kAutocastDevice);
  using at::autocast::cached_cast;
  return op.call(cached_cast(lower, input, kAutocastDevice), cached_cast(lower, weights, kAutocastDevice),
                 cached_cast(lower, biases, kAutocastDevice), relu,
                 cached_cast(at::kFloat, target, kAutocastDevice));
}
}  // namespace

TORCH_LIBRARY_IMPL(CAE_NAMESPACE, CAE_AUTOCAST_KEY, m) {
  m.impl(kConv3x3, &Autocast<kConv3x3, ConvSignature>::call);
  m.impl(kConvTranspose3x3, &Autocast<kConvTranspose3x3, ConvSignature>::call);
  m.impl(kEncoderBlock, &Autocast<kEncoderBlock, EncoderBlockSignature>::call);
  m.impl(kDecoderBlock, &Autocast<kDecoderBlock, DecoderBlockSignature>::call);
  m.impl(kLoss, &Autocast<kLoss, LossSignature, true>::call);
  m.impl("decoder_block_loss", &decoder_block_loss_autocast);
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
#include "cpu/capability.h"

namespace {
// The CPU kernels' instruction-set level (csrc/cpu/capability.h), for Python.
PyObject* cpu_capability(PyObject*, PyObject*) {
  return PyUnicode_FromString(cae::cpu::capability_name(cae::cpu::active_capability()));
}

PyObject* cpu_capabilities(PyObject*, PyObject*) {
  const auto levels = cae::cpu::supported_capabilities();
  PyObject* names = PyList_New(static_cast<Py_ssize_t>(levels.size()));
  for (size_t i = 0; names != nullptr && i < levels.size(); ++i)
    PyList_SET_ITEM(names, i, PyUnicode_FromString(cae::cpu::capability_name(levels[i])));
  return names;
}

PyObject* set_cpu_capability(PyObject*, PyObject* name) {
  const char* text = PyUnicode_AsUTF8(name);
  if (text == nullptr) return nullptr;
  try {
    cae::cpu::set_capability(text);
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"cpu_capability", cpu_capability, METH_NOARGS, "The CPU kernels' instruction-set level in use."},
    {"cpu_capabilities", cpu_capabilities, METH_NOARGS, "The levels this CPU runs, lowest first."},
    {"set_cpu_capability", set_cpu_capability, METH_O, "Selects the CPU kernels' level by name."},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace

// Importing cae_kernels._C loads the library, which registers the ops.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
#ifdef CAE_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
#ifdef CAE_CPU_PORTABLE_BUILD
  const long portable = 1;
#else
  const long portable = 0;
#endif
  // A bad CAE_CPU_CAPABILITY fails the import with its message, not a later op.
  try {
    cae::cpu::active_capability();
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    return nullptr;
  }
  PyObject* m = PyModule_Create(&module);
  if (m != nullptr && (PyModule_AddIntConstant(m, "with_cuda", with_cuda) != 0 ||
                       PyModule_AddIntConstant(m, "cpu_portable_build", portable) != 0)) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
#endif
