"""glibc malloc tuning of the federation processes: model-sized buffers come from the heap."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import ctypes, sys
libc = ctypes.CDLL("libc.so.6")
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
if sys.argv[1] == "tuned":
    from neurofed.allocator import tune_malloc
    assert tune_malloc({})
before = libc.mallinfo2().hblkhd
p = libc.malloc(8 * 1024 * 1024)
print(libc.mallinfo2().hblkhd - before)
"""


def _mmapped_bytes_for_an_8_mib_buffer(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def test_model_sized_buffers_come_from_the_heap_once_tuned():
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallinfo2  # noqa: B018 - glibc >= 2.33
    except (OSError, AttributeError):
        pytest.skip("not glibc >= 2.33: the tuning is a no-op there")
    assert _mmapped_bytes_for_an_8_mib_buffer("plain") >= 8 * 1024 * 1024
    assert _mmapped_bytes_for_an_8_mib_buffer("tuned") == 0


def test_operator_settings_and_the_off_switch_are_respected():
    from neurofed.allocator import tune_malloc

    assert tune_malloc({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1048576"}) is False
    assert tune_malloc({"MALLOC_TRIM_THRESHOLD_": "1"}) is False
    assert tune_malloc({"MALLOC_ARENA_MAX": "4"}) is False
    assert tune_malloc({"NEUROFED_MALLOC_TUNING": "off"}) is False


ARENAS = """
import ctypes, sys, threading
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.fopen.restype = ctypes.c_void_p
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "tuned":
    from neurofed.allocator import tune_malloc
    assert tune_malloc({})
go = threading.Barrier(4)
def work():
    go.wait()  # all four allocate at once, as a site's helper threads do
    libc.malloc(64 * 1024)
threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
fp = libc.fopen(sys.argv[2].encode(), b"w")
libc.malloc_info(0, fp)
libc.fclose(fp)
"""


def test_every_thread_allocates_in_the_main_arena_once_tuned(tmp_path):
    """The per-arena price of the thresholds is paid once for the whole process: its helper
    threads (the update's sender, paho's reader, a secure round's training) share the main arena."""
    if not hasattr(__import__("ctypes").CDLL("libc.so.6"), "malloc_info"):
        pytest.skip("not glibc: the tuning is a no-op there")

    def arenas(mode: str) -> int:
        out = tmp_path / f"{mode}.xml"
        subprocess.run([sys.executable, "-c", ARENAS, mode, str(out)], check=True)
        return out.read_text().count("<heap nr=")

    assert arenas("plain") > 2
    assert arenas("tuned") == 1


TRANSIENT = """
import ctypes, resource, sys, threading
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
import neurofed.allocator as allocator
allocator.ARENA_MAX = int(sys.argv[1])
assert allocator.tune_malloc({})
MIB = 1024 * 1024
faults = []
def work():
    live = [libc.malloc(20 * MIB) for _ in range(2)]  # the model, its optimiser state
    for p in live:
        libc.memset(p, 1, 20 * MIB)
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    for _ in range(10):  # ten steps, each with a convolution's large transient buffers
        step = [libc.malloc(n * MIB) for n in (28, 12)]
        for p, n in zip(step, (28, 12)):
            libc.memset(p, 1, n * MIB)
        for p in step:
            libc.free(p)
    faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
t = threading.Thread(target=work)  # a secure round trains on a worker thread
t.start()
t.join()
print(faults[0])
"""


def test_a_worker_threads_large_transient_buffers_are_faulted_in_once_not_every_step():
    """A secure round trains and scores on a worker thread. In a second arena (heaps of at most
    64 MiB) a step's large buffers beside 40 MiB of live tensors took a fresh heap each time and
    were page-faulted and zeroed anew every step; the tuned process keeps one arena."""
    if not hasattr(__import__("ctypes").CDLL("libc.so.6"), "mallopt"):
        pytest.skip("not glibc: the tuning is a no-op there")
    one_pass = (28 + 12) * 1024 * 1024 // 4096

    def faults(arenas: int) -> int:
        out = subprocess.run(
            [sys.executable, "-c", TRANSIENT, str(arenas)], capture_output=True, text=True, check=True
        )
        return int(out.stdout.strip())

    from neurofed.allocator import ARENA_MAX

    assert faults(ARENA_MAX) < 2 * one_pass  # faulted in once, then reused
    assert faults(2) > 5 * one_pass  # the probe sees the cost where a helper thread has its own arena
