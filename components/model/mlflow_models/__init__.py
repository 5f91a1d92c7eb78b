"""MLflow "models from code": each file here is stored with its model and run at load time, so a
registered model is loaded without unpickling any project class."""
