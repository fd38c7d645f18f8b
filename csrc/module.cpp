// torch_tq._C: the small native layer of torch_tq.
//
// Built against the CPython headers only: no torch, CUDA or Arrow at build time.
// The CUDA runtime is looked up with dlopen() when asked for, so the same build runs
// on machines with and without a GPU. It exports buffers as DLPack capsules (so
// torch.from_dlpack shares their memory); pinned host memory grows from here.
// Everything in torch_tq works without this module.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dlfcn.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>

// ---------------------------------------------------------------------------------------
// DLPack (v0.8 ABI, the "dltensor" capsule every framework accepts), declared here so the
// build needs no header beyond CPython's.
extern "C" {
typedef enum { kDLCPU = 1, kDLCUDA = 2, kDLCUDAHost = 3 } DLDeviceType;
typedef struct {
  int32_t device_type;
  int32_t device_id;
} DLDevice;
typedef enum { kDLInt = 0, kDLUInt = 1, kDLFloat = 2, kDLBfloat = 4, kDLBool = 6 } DLDataTypeCode;
typedef struct {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
} DLDataType;
typedef struct {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;
  uint64_t byte_offset;
} DLTensor;
typedef struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(struct DLManagedTensor* self);
} DLManagedTensor;
}

namespace {

constexpr int kAbiVersion = 1;

const char* const kCudartNames[] = {
    "libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0",
};

// The path of a CUDA runtime this process has already loaded (torch's bundled one, whose
// file name may carry a hash), from /proc/self/maps; empty when there is none.
bool loaded_cudart_path(char* out, size_t cap) {
  FILE* maps = fopen("/proc/self/maps", "r");
  if (maps == nullptr) return false;
  char line[4096];
  bool found = false;
  while (fgets(line, sizeof line, maps) != nullptr) {
    const char* path = strchr(line, '/');
    if (path == nullptr || strstr(path, "libcudart") == nullptr) continue;
    size_t n = strcspn(path, "\n");
    if (n + 1 > cap) continue;
    memcpy(out, path, n);
    out[n] = '\0';
    found = true;
    break;
  }
  fclose(maps);
  return found;
}

// Returns a handle to the CUDA runtime, or nullptr (with the last dlerror in *why).
// Prefers the runtime already in the process (the one torch uses).
void* open_cudart(const char** why) {
  *why = "libcudart not found";
  char path[4096];
  if (loaded_cudart_path(path, sizeof path)) {
    void* handle = dlopen(path, RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD);
    if (handle != nullptr) return handle;
  }
  for (const char* name : kCudartNames) {
    void* handle = dlopen(name, RTLD_NOW | RTLD_LOCAL);
    if (handle != nullptr) return handle;
    const char* err = dlerror();
    if (err != nullptr) *why = err;
  }
  return nullptr;
}

// The CUDA runtime entry points pinned memory needs, resolved once.
struct Cudart {
  bool tried = false;
  void* handle = nullptr;
  const char* why = "not loaded";
  int (*host_alloc)(void**, size_t, unsigned int) = nullptr;
  int (*free_host)(void*) = nullptr;
  int (*host_register)(void*, size_t, unsigned int) = nullptr;
  int (*host_unregister)(void*) = nullptr;
  const char* (*error_string)(int) = nullptr;
  int (*device_count)(int*) = nullptr;
};
Cudart g_cudart;

Cudart* cudart() {
  if (!g_cudart.tried) {
    g_cudart.tried = true;
    g_cudart.handle = open_cudart(&g_cudart.why);
    if (g_cudart.handle != nullptr) {
      void* h = g_cudart.handle;
      g_cudart.host_alloc =
          reinterpret_cast<int (*)(void**, size_t, unsigned int)>(dlsym(h, "cudaHostAlloc"));
      g_cudart.free_host = reinterpret_cast<int (*)(void*)>(dlsym(h, "cudaFreeHost"));
      g_cudart.host_register =
          reinterpret_cast<int (*)(void*, size_t, unsigned int)>(dlsym(h, "cudaHostRegister"));
      g_cudart.host_unregister = reinterpret_cast<int (*)(void*)>(dlsym(h, "cudaHostUnregister"));
      g_cudart.error_string = reinterpret_cast<const char* (*)(int)>(dlsym(h, "cudaGetErrorString"));
      g_cudart.device_count = reinterpret_cast<int (*)(int*)>(dlsym(h, "cudaGetDeviceCount"));
      if (!g_cudart.host_alloc || !g_cudart.free_host || !g_cudart.host_register ||
          !g_cudart.host_unregister || !g_cudart.error_string || !g_cudart.device_count) {
        g_cudart.why = "libcudart lacks the host-memory entry points";
        g_cudart.handle = nullptr;
      }
    }
  }
  return g_cudart.handle != nullptr ? &g_cudart : nullptr;
}

// Sets a Python error for a CUDA failure (or for no CUDA) and returns nullptr.
PyObject* cuda_error(Cudart* rt, int rc, const char* what) {
  if (rt == nullptr) {
    PyErr_Format(PyExc_OSError, "%s: CUDA is not available (%s)", what, g_cudart.why);
  } else {
    PyErr_Format(PyExc_RuntimeError, "%s failed: %s (CUDA error %d)", what, rt->error_string(rc),
                 rc);
  }
  return nullptr;
}

// cuda_status() -> (bool, str): whether pinned memory can be had here, and why not.
PyObject* cuda_status(PyObject*, PyObject*) {
  Cudart* rt = cudart();
  if (rt == nullptr) return Py_BuildValue("(Os)", Py_False, g_cudart.why);
  int count = 0;
  int rc = rt->device_count(&count);
  if (rc != 0) return Py_BuildValue("(Os)", Py_False, rt->error_string(rc));
  if (count == 0) return Py_BuildValue("(Os)", Py_False, "no CUDA device");
  return Py_BuildValue("(Os)", Py_True, "available");
}

// host_alloc(size) -> int: page-locked host memory from cudaHostAlloc.
PyObject* host_alloc(PyObject*, PyObject* arg) {
  unsigned long long size = PyLong_AsUnsignedLongLong(arg);
  if (PyErr_Occurred()) return nullptr;
  Cudart* rt = cudart();
  if (rt == nullptr) return cuda_error(rt, 0, "cudaHostAlloc");
  void* p = nullptr;
  int rc;
  Py_BEGIN_ALLOW_THREADS
  rc = rt->host_alloc(&p, static_cast<size_t>(size), 0);
  Py_END_ALLOW_THREADS
  if (rc != 0) return cuda_error(rt, rc, "cudaHostAlloc");
  return PyLong_FromVoidPtr(p);
}

// One CUDA call taking a host address (cudaFreeHost, cudaHostUnregister), without the GIL.
PyObject* call_on_address(PyObject* arg, int (*Cudart::*fn)(void*), const char* what) {
  void* p = PyLong_AsVoidPtr(arg);
  if (PyErr_Occurred()) return nullptr;
  Cudart* rt = cudart();
  if (rt == nullptr) return cuda_error(rt, 0, what);
  int rc;
  Py_BEGIN_ALLOW_THREADS
  rc = (rt->*fn)(p);
  Py_END_ALLOW_THREADS
  if (rc != 0) return cuda_error(rt, rc, what);
  Py_RETURN_NONE;
}

// free_host(address): gives a cudaHostAlloc block back.
PyObject* free_host(PyObject*, PyObject* arg) {
  return call_on_address(arg, &Cudart::free_host, "cudaFreeHost");
}

// host_unregister(address): undoes host_register.
PyObject* host_unregister(PyObject*, PyObject* arg) {
  return call_on_address(arg, &Cudart::host_unregister, "cudaHostUnregister");
}

// host_register(address, size): page-locks an existing whole allocation.
PyObject* host_register(PyObject*, PyObject* args) {
  unsigned long long address = 0, size = 0;
  if (!PyArg_ParseTuple(args, "KK", &address, &size)) return nullptr;
  Cudart* rt = cudart();
  if (rt == nullptr) return cuda_error(rt, 0, "cudaHostRegister");
  int rc;
  Py_BEGIN_ALLOW_THREADS
  rc = rt->host_register(reinterpret_cast<void*>(static_cast<uintptr_t>(address)), size, 0);
  Py_END_ALLOW_THREADS
  if (rc != 0) return cuda_error(rt, rc, "cudaHostRegister");
  Py_RETURN_NONE;
}

PyObject* abi_version(PyObject*, PyObject*) { return PyLong_FromLong(kAbiVersion); }

constexpr int kMaxDims = 64;

// What a capsule owns: the DLManagedTensor, its shape, and a reference that keeps the
// memory's owner alive (a held Py_buffer export, or a plain reference for a raw pointer).
struct Managed {
  DLManagedTensor tensor;
  int64_t shape[kMaxDims];
  Py_buffer view;
  bool has_view;
  PyObject* owner;  // strong reference (may be null when has_view)
  DLDataType dtype;
  int32_t ndim;
  uint64_t numel;
};

void managed_deleter(DLManagedTensor* self) {
  if (self == nullptr) return;
  Managed* m = static_cast<Managed*>(self->manager_ctx);
  // The consumer may call this from any thread, with or without the GIL.
  PyGILState_STATE gil = PyGILState_Ensure();
  if (m->has_view) PyBuffer_Release(&m->view);
  Py_XDECREF(m->owner);
  PyGILState_Release(gil);
  delete m;
}

// A capsule nobody consumed still owns its tensor: free it with the capsule.
void capsule_destructor(PyObject* capsule) {
  if (PyCapsule_IsValid(capsule, "dltensor")) {
    auto* t = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule, "dltensor"));
    if (t != nullptr && t->deleter != nullptr) t->deleter(t);
  }
  // "used_dltensor": the consumer took ownership and calls the deleter itself.
}

bool parse_shape(PyObject* shape_obj, Managed* m, int32_t* ndim, uint64_t* numel) {
  PyObject* seq = PySequence_Fast(shape_obj, "shape must be a sequence of integers");
  if (seq == nullptr) return false;
  Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  if (n > kMaxDims) {
    Py_DECREF(seq);
    PyErr_Format(PyExc_ValueError, "shape has %zd dimensions; the limit is %d", n, kMaxDims);
    return false;
  }
  uint64_t count = 1;
  for (Py_ssize_t i = 0; i < n; ++i) {
    long long d = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(seq, i));
    if (d == -1 && PyErr_Occurred()) {
      Py_DECREF(seq);
      return false;
    }
    if (d < 0 || d > (1LL << 62)) {
      Py_DECREF(seq);
      PyErr_Format(PyExc_ValueError, "shape entries must be in [0, 2**62], got %lld", d);
      return false;
    }
    m->shape[i] = d;
    if (d != 0 && count > (UINT64_C(1) << 62) / static_cast<uint64_t>(d)) {
      Py_DECREF(seq);
      PyErr_SetString(PyExc_ValueError, "shape has too many elements");
      return false;
    }
    count *= static_cast<uint64_t>(d);
  }
  Py_DECREF(seq);
  *ndim = static_cast<int32_t>(n);
  *numel = count;
  return true;
}

bool parse_dtype(int code, int bits, DLDataType* out) {
  bool ok = false;
  switch (code) {
    case kDLInt: ok = bits == 8 || bits == 16 || bits == 32 || bits == 64; break;
    case kDLUInt: ok = bits == 8 || bits == 16 || bits == 32 || bits == 64; break;
    case kDLFloat: ok = bits == 16 || bits == 32 || bits == 64; break;
    case kDLBfloat: ok = bits == 16; break;
    case kDLBool: ok = bits == 8; break;
    default: ok = false;
  }
  if (!ok) {
    PyErr_Format(PyExc_ValueError, "unsupported DLPack dtype code %d with %d bits", code, bits);
    return false;
  }
  out->code = static_cast<uint8_t>(code);
  out->bits = static_cast<uint8_t>(bits);
  out->lanes = 1;
  return true;
}

// Fills m->tensor for memory [data, data + size) holding numel items from `offset` bytes on.
bool fill_tensor(Managed* m, char* data, uint64_t size, uint64_t offset, int device_type,
                 int device_id) {
  const DLDataType dtype = m->dtype;
  const uint64_t numel = m->numel;
  uint64_t itemsize = dtype.bits / 8;
  if (offset > size || numel > (size - offset) / itemsize) {
    PyErr_Format(PyExc_ValueError,
                 "buffer of %llu bytes is too small for %llu items of %llu bytes at offset %llu",
                 static_cast<unsigned long long>(size), static_cast<unsigned long long>(numel),
                 static_cast<unsigned long long>(itemsize),
                 static_cast<unsigned long long>(offset));
    return false;
  }
  uintptr_t start = reinterpret_cast<uintptr_t>(data) + offset;
  if (numel != 0 && start % itemsize != 0) {
    // A tensor over a misaligned address is undefined behaviour for most kernels: refuse
    // and let the caller copy once.
    PyErr_Format(PyExc_BufferError, "address %p is not aligned to the %llu-byte item size",
                 reinterpret_cast<void*>(start), static_cast<unsigned long long>(itemsize));
    return false;
  }
  DLTensor& t = m->tensor.dl_tensor;
  t.data = reinterpret_cast<void*>(start);
  t.device.device_type = device_type;
  t.device.device_id = device_id;
  t.ndim = m->ndim;
  t.dtype = dtype;
  t.shape = m->shape;
  t.strides = nullptr;  // compact, row-major
  t.byte_offset = 0;
  m->tensor.manager_ctx = m;
  m->tensor.deleter = managed_deleter;
  return true;
}

// A new Managed with its dtype and shape parsed; nullptr (with a Python error) otherwise.
Managed* new_managed(int code, int bits, PyObject* shape) {
  Managed* m = new (std::nothrow) Managed();
  if (m == nullptr) {
    PyErr_NoMemory();
    return nullptr;
  }
  if (!parse_dtype(code, bits, &m->dtype) || !parse_shape(shape, m, &m->ndim, &m->numel)) {
    delete m;
    return nullptr;
  }
  return m;
}

PyObject* make_capsule(Managed* m) {
  PyObject* capsule = PyCapsule_New(&m->tensor, "dltensor", capsule_destructor);
  if (capsule == nullptr) managed_deleter(&m->tensor);
  return capsule;
}

// to_dlpack(obj, code, bits, shape, offset=0) -> capsule
// Exports the memory of any object with the buffer protocol (a pyarrow.Buffer, a memoryview,
// a bytearray, ...) as a CPU DLPack capsule. The capsule holds the buffer export, so the
// memory outlives `obj` for as long as the consumer's tensor lives.
PyObject* to_dlpack(PyObject*, PyObject* args, PyObject* kwargs) {
  static const char* kwlist[] = {"obj", "code", "bits", "shape", "offset", nullptr};
  PyObject* obj = nullptr;
  int code = 0, bits = 0;
  PyObject* shape = nullptr;
  unsigned long long offset = 0;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OiiO|K", const_cast<char**>(kwlist), &obj,
                                   &code, &bits, &shape, &offset)) {
    return nullptr;
  }
  Managed* m = new_managed(code, bits, shape);
  if (m == nullptr) return nullptr;
  if (PyObject_GetBuffer(obj, &m->view, PyBUF_SIMPLE) != 0) {
    delete m;
    return nullptr;
  }
  m->has_view = true;
  if (!fill_tensor(m, static_cast<char*>(m->view.buf), static_cast<uint64_t>(m->view.len),
                   offset, kDLCPU, 0)) {
    PyBuffer_Release(&m->view);
    delete m;
    return nullptr;
  }
  return make_capsule(m);
}

// pointer_to_dlpack(address, size, owner, code, bits, shape, device_type=1, device_id=0)
// -> capsule over raw memory that `owner` keeps valid (a pinned block, a device buffer).
PyObject* pointer_to_dlpack(PyObject*, PyObject* args, PyObject* kwargs) {
  static const char* kwlist[] = {"address", "size", "owner", "code", "bits", "shape",
                                 "device_type", "device_id", nullptr};
  unsigned long long address = 0, size = 0;
  PyObject* owner = nullptr;
  int code = 0, bits = 0, device_type = kDLCPU, device_id = 0;
  PyObject* shape = nullptr;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "KKOiiO|ii", const_cast<char**>(kwlist),
                                   &address, &size, &owner, &code, &bits, &shape, &device_type,
                                   &device_id)) {
    return nullptr;
  }
  if (device_type != kDLCPU && device_type != kDLCUDA && device_type != kDLCUDAHost) {
    PyErr_Format(PyExc_ValueError, "unsupported DLPack device type %d", device_type);
    return nullptr;
  }
  if (address == 0 && size != 0) {
    PyErr_SetString(PyExc_ValueError, "null address");
    return nullptr;
  }
  Managed* m = new_managed(code, bits, shape);
  if (m == nullptr) return nullptr;
  if (!fill_tensor(m, reinterpret_cast<char*>(static_cast<uintptr_t>(address)), size, 0,
                   device_type, device_id)) {
    delete m;
    return nullptr;
  }
  Py_INCREF(owner);
  m->owner = owner;
  return make_capsule(m);
}

// buffer_address(obj) -> int: the start address of an object's buffer (for identity tests).
PyObject* buffer_address(PyObject*, PyObject* obj) {
  Py_buffer view;
  if (PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE) != 0) return nullptr;
  PyObject* out = PyLong_FromVoidPtr(view.buf);
  PyBuffer_Release(&view);
  return out;
}

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
    {"to_dlpack", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(to_dlpack)),
     METH_VARARGS | METH_KEYWORDS,
     "to_dlpack(obj, code, bits, shape, offset=0) -> PyCapsule\n\n"
     "A CPU DLPack capsule over the buffer of obj (kept alive by the capsule's tensor)."},
    {"pointer_to_dlpack",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(pointer_to_dlpack)),
     METH_VARARGS | METH_KEYWORDS,
     "pointer_to_dlpack(address, size, owner, code, bits, shape, device_type=1, device_id=0)"
     " -> PyCapsule\n\nA DLPack capsule over raw memory that owner keeps valid."},
    {"buffer_address", buffer_address, METH_O,
     "buffer_address(obj) -> int\n\nThe start address of obj's buffer."},
    {"cuda_status", cuda_status, METH_NOARGS,
     "cuda_status() -> (bool, str)\n\nWhether pinned host memory is available, and why not."},
    {"host_alloc", host_alloc, METH_O,
     "host_alloc(size) -> int\n\nPage-locked host memory (cudaHostAlloc); OSError without CUDA."},
    {"free_host", free_host, METH_O, "free_host(address)\n\nReleases a host_alloc block."},
    {"host_register", host_register, METH_VARARGS,
     "host_register(address, size)\n\nPage-locks an existing whole allocation."},
    {"host_unregister", host_unregister, METH_O,
     "host_unregister(address)\n\nUndoes host_register."},
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
