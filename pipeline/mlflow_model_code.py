"""The models-from-code entry of the generator's pyfunc model: MLflow runs this file when it loads the model,
so the model object is built from our code (the model's code_paths), never unpickled."""

from mlflow.models import set_model

from pipeline.mlflow_model import GeneratorModel

set_model(GeneratorModel())
