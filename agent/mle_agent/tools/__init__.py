"""Model tools an agent runs as ordinary tasks, and `mle` runs locally in a subprocess.

Each tool is a module run with `python -m mle_agent.tools.<tool>` (recipe built-ins run it with
the agent's own interpreter, `"$MLE_PYTHON"`): it prints a human summary (or `--json`), writes its
figures to `--metrics FILE` for the ledger, and reports a user error as one line on stderr
(`error: ...`) with exit code 2, or 3 when something must be installed first (the line says what).

    _cli         what every tool's command line shares: parser, error line, exit code, metrics
    _data        evaluation and calibration files; accuracy of a loaded model
    quantize     ONNX -> int8 ONNX (onnxruntime.quantization), optionally -> int8 TFLite
    _onnx_graph  graph edits around the quantizer      _tflite    ONNX -> TFLite with TensorFlow
    benchmark    load time, p50/p95 latency, throughput, peak RSS, accuracy of model variants
    _budget      the `--pick` budget: upper limits such as p95<=20ms,rss<=150MB
"""
