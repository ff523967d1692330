"""ONNX export of an MoE model with a bit-width per expert, runnable in stock onnxruntime.

``moec export CHECKPOINT --plan PLAN --out DIR`` writes ``DIR/prefill.onnx`` and ``DIR/decode.onnx``
(built with ``onnx.helper``, opset 21 + ``com.microsoft`` 1, IR 10), one shared external data file
``DIR/weights.bin``, ``tokenizer.json`` and ``export.json`` (a summary). Where things live:

* ``quantized_matmul.py`` -- the stored form of a weight per bit-width: 2/4/8 bits as
  ``com.microsoft.MatMulNBits`` (moec's packed layout is its B layout), 3/5/6 bits as moec's packed
  bytes unpacked in-graph (BitShift/BitwiseAnd) then ``(q - zero) * scale``, 16 bits as float16 +
  Cast; embeddings gather packed rows and dequantize only those.
* ``onnx_ops.py`` -- the ONNX ops that ``moec.arch.blocks`` (the layers, written once) are emitted
  through: RMSNorm, RoPE, GQA attention with KV cache, and routing: TopK, then one ``If`` per
  expert guarded by "some token chose this expert", whose branch gathers the routed tokens, runs
  the expert and scatter-adds the gated result; a decode step therefore reads only the top-k
  experts' weights.
* ``graph_builder.py`` (graph interfaces and model metadata ``moec.plan`` / ``moec.config``),
  ``writer.py`` (external data,
  atomic directory), ``exporter.py`` (orchestration, ``export.json``), ``inspect_onnx.py``
  and ``inspect.py`` (``moec inspect``: an export or a bundle, light imports), ``ort_runner.py`` (prefill/decode/greedy in onnxruntime), ``weights.py``
  (packed weights from a model, or random packed weights for benchmarks).
"""
