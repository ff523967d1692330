"""On-device runtime: loads a verified bundle with the TVM runtime alone and generates text.

Imports only ``tvm.runtime``, numpy and tokenizers (set ``TVM_USE_RUNTIME_LIB=1`` on a
device that has only the runtime library).
"""
