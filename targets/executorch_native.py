"""Run an ExecuTorch ``.pte`` program without torch: a small C library over the wheel's runtime, through ctypes.

ExecuTorch's Python bindings link libtorch, which a board (or dlopt's emulated aarch64, whose only
torch wheel is a CUDA build that will not import there) does not have.  The ``executorch`` wheel
also ships torch-free runtime libraries and their headers (``executorch/lib``, ``executorch/include``);
``build`` compiles ``SOURCE`` (a C ABI over ``executorch::extension::module::Module``) against them,
for x86_64 with ``g++`` or for aarch64 with ``aarch64-linux-gnu-g++``, into one folder:

    libpte_run.so                          this library (rpath $ORIGIN)
    libexecutorch.so                       the runtime (program loader, Module, tensors)
    libexecutorch_backend_xnnpack.so       XNNPACK delegate
    libexecutorch_kernels_optimized.so     the operators outside the delegate
    libexecutorch_kernels_quantized.so     quantize/dequantize operators of int8 programs
    libexecutorch_threadpool.so            the thread pool XNNPACK and the kernels share

The backend and the kernel libraries register themselves from static initialisers, so they are
linked with --no-as-needed.  ``PteNative`` opens such a folder and runs the program's ``forward``.
``PteNative`` lives in ``dlopt.targets.executorch_plain`` (pasted into run_candidates.py; stdlib, numpy).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from dlopt.targets.executorch_plain import PteNative  # noqa: F401 - the runner, beside what builds it

LIBRARY = "libpte_run.so"
# The wheel's libraries the runner needs; OpenVINO, QNN and ETDump are left out.
RUNTIME_LIBRARIES = ("libexecutorch.so", "libexecutorch_backend_xnnpack.so", "libexecutorch_kernels_optimized.so",
                     "libexecutorch_kernels_quantized.so", "libexecutorch_threadpool.so")
COMPILERS = {"x86_64": ("g++", "g++"), "aarch64": ("aarch64-linux-gnu-g++", "g++-aarch64-linux-gnu")}

SOURCE = r"""
// A C ABI over ExecuTorch's Module: open a .pte, describe and run its "forward", read its outputs.
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <executorch/extension/module/module.h>
#include <executorch/runtime/core/evalue.h>
#include <executorch/runtime/core/exec_aten/exec_aten.h>
#include <executorch/runtime/platform/platform.h>

// The wheel ships libexecutorch_threadpool.so but not threadpool.h: these two members are all we call.
namespace executorch { namespace extension { namespace threadpool {
class ThreadPool {
 public:
  size_t get_thread_count() const;
  bool _unsafe_reset_threadpool(uint32_t num_threads);
};
ThreadPool* get_threadpool();
}}}

using executorch::extension::module::Module;
using executorch::runtime::Error;
using executorch::runtime::EValue;
using executorch::runtime::MethodMeta;
using executorch::runtime::Tag;
using executorch::runtime::etensor::ScalarType;
using executorch::runtime::etensor::Tensor;
using executorch::runtime::etensor::TensorImpl;

namespace {

const char* METHOD = "forward";

struct Input {
  ScalarType dtype;
  std::vector<TensorImpl::SizesType> sizes;
  std::vector<TensorImpl::DimOrderType> dim_order;
  std::vector<TensorImpl::StridesType> strides;
  size_t nbytes;
};

struct Handle {
  std::unique_ptr<Module> module;
  std::vector<Input> inputs;
  std::vector<EValue> outputs;  // the last run's; their data lives in the module's planned memory
};

// The runtime's log: info lines are dropped (PTE_RUN_LOG=1 prints everything to stderr), and the first error
// logged since the last call into this library becomes the end of that call's one-line message.
std::mutex log_mutex;
std::string first_error;

void on_log(et_timestamp_t, et_pal_log_level_t level, const char* file, const char*, size_t line,
            const char* message, size_t length) {
  static const bool verbose = std::getenv("PTE_RUN_LOG") != nullptr;
  std::string text(message, length);
  while (!text.empty() && (text.back() == '\n' || text.back() == '\r')) text.pop_back();
  for (char& c : text) if (c == '\n' || c == '\r') c = ' ';  // the messages built from it stay one line
  if (verbose) fprintf(stderr, "%c executorch:%s:%zu] %s\n", static_cast<char>(level), file, line, text.c_str());
  if (level != kError && level != kFatal) return;
  std::lock_guard<std::mutex> lock(log_mutex);
  if (first_error.empty()) first_error = text;
}

const bool pal_registered = executorch::runtime::register_pal(
    executorch::runtime::PalImpl::create(on_log, __FILE__));

void forget_log() {
  std::lock_guard<std::mutex> lock(log_mutex);
  first_error.clear();
}

void say(char* err, size_t errlen, const char* format, ...) {
  if (err == nullptr || errlen == 0) return;
  va_list args;
  va_start(args, format);
  int used = vsnprintf(err, errlen, format, args);
  va_end(args);
  std::lock_guard<std::mutex> lock(log_mutex);
  if (!first_error.empty() && used >= 0 && static_cast<size_t>(used) + 2 < errlen) {
    snprintf(err + used, errlen - used, ": %s", first_error.c_str());
  }
}

const char* error_name(Error error) {
  switch (static_cast<int>(error)) {
    case 0x01: return "Internal";
    case 0x02: return "InvalidState";
    case 0x10: return "NotSupported";
    case 0x11: return "NotImplemented";
    case 0x12: return "InvalidArgument";
    case 0x13: return "InvalidType";
    case 0x14: return "OperatorMissing (a kernel library is not loaded)";
    case 0x20: return "NotFound";
    case 0x21: return "MemoryAllocationFailed";
    case 0x22: return "AccessFailed";
    case 0x23: return "InvalidProgram";
    case 0x24: return "InvalidExternalData";
    case 0x25: return "OutOfResources";
    case 0x30: return "DelegateInvalidCompatibility (a backend is not linked in)";
    case 0x31: return "DelegateMemoryAllocationFailed";
    case 0x32: return "DelegateInvalidHandle";
    default: return "error";
  }
}

bool contiguous(const uint8_t* order, size_t n) {
  for (size_t d = 0; d < n; ++d) if (order[d] != d) return false;
  return true;
}

}  // namespace

extern "C" {

int pte_threads(int threads) {
  auto* pool = executorch::extension::threadpool::get_threadpool();
  if (pool == nullptr) return -1;
  if (threads > 0) pool->_unsafe_reset_threadpool(static_cast<uint32_t>(threads));
  return static_cast<int>(pool->get_thread_count());
}

void* pte_open(const char* path, int threads, char* err, size_t errlen) {
  forget_log();
  try {
    if (threads > 0 && pte_threads(threads) < 0) {
      say(err, errlen, "no thread pool in libexecutorch_threadpool.so");
      return nullptr;
    }
    auto handle = std::make_unique<Handle>();
    handle->module = std::make_unique<Module>(path, Module::LoadMode::Mmap);
    Error error = handle->module->load_method(METHOD);
    if (error != Error::Ok) {
      say(err, errlen, "cannot load method %s of %s: %s (0x%x)", METHOD, path, error_name(error),
          static_cast<int>(error));
      return nullptr;
    }
    auto meta = handle->module->method_meta(METHOD);
    if (!meta.ok()) {
      say(err, errlen, "no metadata for %s in %s: %s", METHOD, path, error_name(meta.error()));
      return nullptr;
    }
    for (size_t i = 0; i < meta->num_inputs(); ++i) {
      auto tag = meta->input_tag(i);
      if (!tag.ok() || *tag != Tag::Tensor) {
        say(err, errlen, "input %zu of %s is not a tensor; only tensor inputs are supported", i, path);
        return nullptr;
      }
      auto info = meta->input_tensor_meta(i);
      if (!info.ok()) {
        say(err, errlen, "no metadata for input %zu of %s", i, path);
        return nullptr;
      }
      auto order = info->dim_order();
      if (!contiguous(order.data(), order.size())) {
        say(err, errlen, "input %zu of %s is not in contiguous dim order; only contiguous inputs are supported", i, path);
        return nullptr;
      }
      Input input;
      input.dtype = info->scalar_type();
      input.sizes.assign(info->sizes().begin(), info->sizes().end());
      input.dim_order.assign(order.begin(), order.end());
      input.strides.resize(input.sizes.size());
      TensorImpl::StridesType stride = 1;
      for (size_t d = input.sizes.size(); d-- > 0;) {
        input.strides[d] = stride;
        stride *= input.sizes[d];
      }
      input.nbytes = info->nbytes();
      handle->inputs.push_back(std::move(input));
    }
    return handle.release();
  } catch (const std::exception& e) {
    say(err, errlen, "cannot open %s: %s", path, e.what());
  } catch (...) {
    say(err, errlen, "cannot open %s: unknown C++ exception", path);
  }
  return nullptr;
}

int pte_inputs(void* h) { return static_cast<int>(static_cast<Handle*>(h)->inputs.size()); }

int pte_input_info(void* h, int i, int* dtype, int64_t* sizes, int* ndim, size_t* nbytes) {
  auto* handle = static_cast<Handle*>(h);
  if (i < 0 || i >= static_cast<int>(handle->inputs.size())) return 1;
  const Input& input = handle->inputs[i];
  if (*ndim < static_cast<int>(input.sizes.size())) return 2;
  *dtype = static_cast<int>(input.dtype);
  *ndim = static_cast<int>(input.sizes.size());
  for (size_t d = 0; d < input.sizes.size(); ++d) sizes[d] = input.sizes[d];
  *nbytes = input.nbytes;
  return 0;
}

int pte_run(void* h, const void* const* inputs, const size_t* nbytes, char* err, size_t errlen) {
  auto* handle = static_cast<Handle*>(h);
  forget_log();
  try {
    std::vector<std::unique_ptr<TensorImpl>> impls;
    std::vector<EValue> values;
    for (size_t i = 0; i < handle->inputs.size(); ++i) {
      Input& input = handle->inputs[i];
      if (nbytes[i] != input.nbytes) {
        say(err, errlen, "input %zu holds %zu bytes; the program takes %zu", i, nbytes[i], input.nbytes);
        return 1;
      }
      impls.push_back(std::make_unique<TensorImpl>(
          input.dtype, static_cast<ssize_t>(input.sizes.size()), input.sizes.data(), const_cast<void*>(inputs[i]),
          input.dim_order.data(), input.strides.data()));
      values.emplace_back(Tensor(impls.back().get()));
    }
    handle->outputs.clear();
    auto result = handle->module->execute(METHOD, values);
    if (!result.ok()) {
      say(err, errlen, "%s failed: %s (0x%x)", METHOD, error_name(result.error()), static_cast<int>(result.error()));
      return 1;
    }
    handle->outputs = std::move(*result);
    for (size_t i = 0; i < handle->outputs.size(); ++i) {
      if (!handle->outputs[i].isTensor()) {
        say(err, errlen, "output %zu is not a tensor; only tensor outputs are supported", i);
        handle->outputs.clear();
        return 1;
      }
      auto order = handle->outputs[i].toTensor().dim_order();
      if (!contiguous(order.data(), order.size())) {
        say(err, errlen, "output %zu is not in contiguous dim order; only contiguous outputs are supported", i);
        handle->outputs.clear();
        return 1;
      }
    }
    return 0;
  } catch (const std::exception& e) {
    say(err, errlen, "%s failed: %s", METHOD, e.what());
  } catch (...) {
    say(err, errlen, "%s failed: unknown C++ exception", METHOD);
  }
  handle->outputs.clear();
  return 1;
}

int pte_outputs(void* h) { return static_cast<int>(static_cast<Handle*>(h)->outputs.size()); }

int pte_output(void* h, int i, int* dtype, int64_t* sizes, int* ndim, const void** data, size_t* nbytes) {
  auto* handle = static_cast<Handle*>(h);
  if (i < 0 || i >= static_cast<int>(handle->outputs.size())) return 1;
  const Tensor& tensor = handle->outputs[i].toTensor();
  if (*ndim < static_cast<int>(tensor.dim())) return 2;
  *dtype = static_cast<int>(tensor.scalar_type());
  *ndim = static_cast<int>(tensor.dim());
  for (ssize_t d = 0; d < tensor.dim(); ++d) sizes[d] = tensor.size(d);
  *data = tensor.const_data_ptr();
  *nbytes = tensor.nbytes();
  return 0;
}

void pte_close(void* h) { delete static_cast<Handle*>(h); }

}  // extern "C"
"""

# What the wheel's CMake config says a consumer must compile with (lib/cmake/executorch/executorch-config.cmake).
DEFINES = ("-DC10_USING_CUSTOM_GENERATED_MACROS", "-DET_EVENT_TRACER_ENABLED")


def build(site_packages: Path, out_dir: Path, arch: str) -> Path:
    """Compile ``SOURCE`` for ``arch`` ("x86_64" or "aarch64") against the executorch wheel installed in
    ``site_packages`` into ``out_dir/libpte_run.so``, with the wheel's runtime libraries copied beside it.

    The wheel must be the one for ``arch`` (the aarch64 one installed with ``pip --target``).  Returns the
    library's path; raises OSError (no compiler, no wheel) or RuntimeError (the compiler failed).
    """
    if arch not in COMPILERS:
        raise RuntimeError(f"no ExecuTorch runner for {arch}; known: {', '.join(COMPILERS)}")
    compiler, package = COMPILERS[arch]
    cxx = shutil.which(compiler)
    if cxx is None:
        raise OSError(f"no {compiler} to build the ExecuTorch runner for {arch}; apt-get install {package}")
    root = Path(site_packages) / "executorch"
    include, lib = root / "include", root / "lib"
    missing = [name for name in RUNTIME_LIBRARIES if not (lib / name).is_file()]
    if not (include / "executorch" / "extension" / "module" / "module.h").is_file() or missing:
        raise OSError(f"no executorch wheel with its runtime libraries in {site_packages} "
                      f"(missing {', '.join(missing) or 'include/'}); pip install executorch==1.5.1 "
                      f"(for aarch64: pip install --target with --platform manylinux_2_28_aarch64)")
    wrong = _elf_machine(lib / RUNTIME_LIBRARIES[0])
    if wrong != arch:
        raise OSError(f"the executorch wheel in {site_packages} is for {wrong}, not {arch}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in RUNTIME_LIBRARIES:
        shutil.copy2(lib / name, out_dir / name)
    target = out_dir / LIBRARY
    with tempfile.TemporaryDirectory(prefix="pte-run-") as work:
        source = Path(work) / "pte_run.cpp"
        source.write_text(SOURCE)
        staged = out_dir / f".{LIBRARY}.partial"  # renamed into place once whole
        command = [cxx, "-std=c++17", "-O2", "-fPIC", "-shared", *DEFINES, f"-I{include}",
                   f"-I{include / 'executorch/runtime/core/portable_type/c10'}", str(source),
                   "-o", str(staged), f"-L{out_dir}", "-Wl,--no-as-needed",
                   *(f"-l:{name}" for name in RUNTIME_LIBRARIES), "-Wl,--as-needed", "-Wl,-rpath,$ORIGIN"]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            first = next((line for line in done.stderr.splitlines() if "error" in line), done.stderr.strip()[:300])
            staged.unlink(missing_ok=True)
            raise RuntimeError(f"{compiler} failed building {LIBRARY} for {arch}: {first}")
        os.replace(staged, target)
    return target


def _elf_machine(path: Path) -> str:
    """x86_64, aarch64 or what else the ELF header of ``path`` says."""
    with open(path, "rb") as f:
        header = f.read(20)
    machine = int.from_bytes(header[18:20], "little")
    return {62: "x86_64", 183: "aarch64"}.get(machine, f"ELF machine {machine}")


def folder_size(folder: Path) -> int:
    """Bytes in the plain files directly in ``folder`` (what ``build`` wrote there)."""
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())
