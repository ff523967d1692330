"""A faster lookup of the TVMScript parser from inside a ``T.macro`` call (apache-tvm 0.27).

Every ``@T.macro`` call in a ``@T.prim_func`` finds the running parser by walking up the Python
stack to the first frame whose globals hold it. TVM walks with ``inspect.getouterframes``, which
also reads each frame's source line from disk (``getframeinfo`` → ``getmodule`` scans
``sys.modules`` for every frame): about half of a tiny model's ``moec compile`` (and more under deep
stacks such as pytest's) went there. :func:`install` replaces it with a walk over ``frame.f_back``
that visits the same frames (this one first, as TVM's does) in the same order and returns the same
parser, without the source lines. Installed when :mod:`moec.lower` is imported; a TVM without the
method is left alone.
"""

from __future__ import annotations

import sys

from tvm.script.parser.core.parser import ScriptMacro


def _find_parser_def(self):
    """The parser of the innermost enclosing TVMScript parse (TVM's ``ScriptMacro._find_parser_def``)."""
    frame = sys._getframe()
    while frame is not None:
        parser = frame.f_globals.get(ScriptMacro.parser_object_name)
        if parser is not None:
            return parser
        frame = frame.f_back
    raise RuntimeError(f"{ScriptMacro.parser_object_name} not available")


#: TVM's own lookup, as it was before :func:`install` (None until then, or where TVM has none)
tvm_find_parser_def = None


def install() -> bool:
    """Use :func:`_find_parser_def` for every TVMScript macro, keeping TVM's own as
    :data:`tvm_find_parser_def`; False where TVM has no such method."""
    global tvm_find_parser_def
    current = getattr(ScriptMacro, "_find_parser_def", None)
    if not callable(current):
        return False
    if current is not _find_parser_def:
        tvm_find_parser_def = current
    ScriptMacro._find_parser_def = _find_parser_def
    return True
