"""Models as plain functions of batches: the typed model card, config.pbtxt, the ONNX
Runtime sessions, preprocessing and the model repository. No grpc, no engine."""
