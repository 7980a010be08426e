"""The transport-free data plane: what both protocols ask of the models (classify, infer,
generate, caption, sequence steps), the deployments it serves them from (model, engine,
batcher, lease), server-held sequences, and model control (load, reload, unload)."""
