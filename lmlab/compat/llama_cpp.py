"""llama-cpp-python on its plain CPU path: the reference engine of lmlab's benchmarks and GGUF-export tests.

llama.cpp puts weights in "extra" buffer types where the CPU has them (AMX tiles, repacked layouts). On Intel
CPUs with AMX, llama-cpp-python 0.3.36 built from source segfaults in the AMX one on the first prompt of more
than one token (ggml-org/llama.cpp#20824): a crash that kills the whole calling process (a test run, a
benchmark). llama.cpp's `use_extra_bufts` model parameter turns them off, but llama-cpp-python's `Llama`
and its server take no argument for it, so this sets it in the bindings' default parameters while a model
loads. llama_cpp is imported only when called (an optional dependency).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def no_extra_buffer_types() -> Iterator[None]:
    """Models that llama-cpp-python loads inside this block use llama.cpp's plain CPU buffers."""
    import llama_cpp.llama_cpp as bindings

    defaults = bindings.llama_model_default_params

    def plain_cpu_params():
        params = defaults()
        params.use_extra_bufts = False
        return params

    bindings.llama_model_default_params = plain_cpu_params
    try:
        yield
    finally:
        bindings.llama_model_default_params = defaults
