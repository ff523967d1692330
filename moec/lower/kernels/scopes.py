"""Storage scope of a kernel's small per-task buffers (register tiles), so that TVM keeps them on the stack.

apache-tvm 0.27's ``LowerTVMBuiltin`` leaves an allocation on the CPU stack only when its scope is
``global`` and it is under ``kMaxStackAlloca`` (1 KiB); every other one, ``scope="local"`` included,
becomes a ``TVMBackendAllocWorkspace`` / ``TVMBackendFreeWorkspace`` pair, once per iteration of the
loop that holds it: per task inside a parallel loop. A stack buffer with constant indices is then
promoted to registers by LLVM; a workspace one is memory LLVM knows nothing about.
"""

from __future__ import annotations

#: TVM's ``runtime::kMaxStackAlloca``: allocations of this many bytes or more never go on the stack.
MAX_STACK_BYTES = 1024


def stack_scope(nbytes: int) -> str:
    """``"global"`` (the stack) for a constant-size buffer under :data:`MAX_STACK_BYTES`, else ``"local"``."""
    return "global" if nbytes < MAX_STACK_BYTES else "local"
