"""Pure learning code: data, models, cutting a model, training and evaluation steps. No I/O to peers."""
