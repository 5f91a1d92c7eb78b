"""The model phase: training, weights, evaluation and metrics, comparison, the MLflow registry, the model gate."""
