"""Dynamic batching for unary calls, beside the model, not inside it."""
