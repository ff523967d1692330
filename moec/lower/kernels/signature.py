"""One TVMScript signature for a kernel whose buffer parameters vary in number.

TVMScript spells out every buffer parameter of a ``@T.prim_func``, so a nested kernel that takes 3 or 4
segments, with or without a second (SwiGLU up) stack, would need one signature per combination: four
near-identical blocks of ``T.Buffer`` lines per kernel. Instead a kernel writes its widest signature once
(a parameter the variant lacks gets :data:`UNUSED`'s shape) and :func:`drop_params` removes the parameters
the variant does not take; its body never reads them, which :func:`drop_params` checks. The result is the
same PrimFunc the narrower signature would have parsed to (``tests/lower/test_kernel_signature.py``).
"""

from __future__ import annotations

from tvm import tirx

from moec.core.errors import MoecError

#: Shape of a parameter the variant does not take (any shape: it is dropped before anything reads it).
UNUSED = (1,)


def drop_params(func: tirx.PrimFunc, names) -> tirx.PrimFunc:
    """``func`` without its parameters named in ``names`` (none of which its body may use); ``func`` itself when
    ``names`` is empty."""
    names = set(names)
    if not names:
        return func
    keep = [p for p in func.params if p.name not in names]
    missing = names - {p.name for p in func.params}
    if missing:
        raise MoecError(f"internal: {func.attrs['global_symbol']} has no parameters {sorted(missing)}")
    used = {v.name for v in tirx.analysis.undefined_vars(func.body, keep)} & names
    if used:
        raise MoecError(f"internal: {func.attrs['global_symbol']} reads the dropped parameters {sorted(used)}")
    return tirx.PrimFunc(keep, func.body, func.ret_type, func.attrs)


def segment_names(nseg: int, most: int = 4, prefix: str = "seg", suffix: str = "") -> list[str]:
    """Names of the segment parameters ``{prefix}{s}{suffix}`` for ``s`` from ``nseg`` to ``most - 1``: those a
    kernel of ``nseg`` segments drops from a signature written for ``most`` (``nseg`` 0: all of them)."""
    return [f"{prefix}{s}{suffix}" for s in range(nseg, most)]
