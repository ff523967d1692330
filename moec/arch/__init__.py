"""Model architecture written once: the primitive op set (``ops.py``) and the blocks built from it (``blocks.py``)."""
