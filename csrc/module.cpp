// The Python module sib_fast._C. It holds no Python functions: importing it
// loads this library, whose static initialisers register the sib_fast ops
// (schemas in sib_head.cpp, kernels in cpu/ and cuda/) with the dispatcher.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
