// torch_tq._C: the small native layer of torch_tq.
//
// Built against the CPython headers only: no torch, CUDA or Arrow at build time.
// The CUDA runtime is looked up with dlopen() when asked for, so the same build runs
// on machines with and without a GPU. Later parts (DLPack export, pinned host memory)
// grow from here; everything in torch_tq works without this module.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dlfcn.h>

namespace {

constexpr int kAbiVersion = 1;

const char* const kCudartNames[] = {
    "libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0",
};

// Returns a handle to the CUDA runtime, or nullptr (with the last dlerror in *why).
void* open_cudart(const char** why) {
  *why = "libcudart not found";
  for (const char* name : kCudartNames) {
    void* handle = dlopen(name, RTLD_NOW | RTLD_LOCAL);
    if (handle != nullptr) return handle;
    const char* err = dlerror();
    if (err != nullptr) *why = err;
  }
  return nullptr;
}

PyObject* abi_version(PyObject*, PyObject*) { return PyLong_FromLong(kAbiVersion); }

// cuda_runtime_version() -> int | None
// The CUDA runtime's version (e.g. 12040), or None when no runtime can be loaded.
PyObject* cuda_runtime_version(PyObject*, PyObject*) {
  const char* why = nullptr;
  void* handle = open_cudart(&why);
  if (handle == nullptr) Py_RETURN_NONE;
  using Fn = int (*)(int*);
  auto fn = reinterpret_cast<Fn>(dlsym(handle, "cudaRuntimeGetVersion"));
  if (fn == nullptr) {
    dlclose(handle);
    Py_RETURN_NONE;
  }
  int version = 0;
  int rc = fn(&version);
  dlclose(handle);
  if (rc != 0) {
    PyErr_Format(PyExc_RuntimeError, "cudaRuntimeGetVersion failed with CUDA error %d", rc);
    return nullptr;
  }
  return PyLong_FromLong(version);
}

PyMethodDef kMethods[] = {
    {"abi_version", abi_version, METH_NOARGS, "abi_version() -> int\n\nVersion of this module's C ABI."},
    {"cuda_runtime_version", cuda_runtime_version, METH_NOARGS,
     "cuda_runtime_version() -> int | None\n\n"
     "The CUDA runtime version found with dlopen, or None when there is none."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef kModule = {
    PyModuleDef_HEAD_INIT, "torch_tq._C", "Native helpers of torch_tq (optional at run time).", -1,
    kMethods,
};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }
