"""MLflow pyfunc for a DrSpot classifier: artifacts ``model_dir`` (model.pt + model_config.json).

Input: a DataFrame with column ``image`` (encoded image bytes) and optional ``box`` (normalised
x_min, y_min, x_max, y_max, or None for the whole image). Output: one row per input with a
probability column per class, ``malignant_probability`` and ``label``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

import mlflow


class ClassifierModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        import components  # noqa: F401  (offline settings)
        from components.model.classifier import load_model

        self.model, self.config = load_model(context.artifacts["model_dir"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from components.data.images import decode
        from components.data.preprocess import to_uint8
        from components.model.classifier import predict
        from components.model.metrics import adjustment_offsets, decide, softmax

        c = self.config
        boxes = model_input["box"] if "box" in model_input else [None] * len(model_input)
        crops = np.stack(
            [
                to_uint8(decode(bytes(img)).rgb, box, c["crop_margin"], c["input_size"])
                for img, box in zip(model_input["image"], boxes, strict=True)
            ]
        )
        logits, _ = predict(self.model, crops, c["mean"], c["std"], tta=c.get("tta", False))
        p = softmax(logits, c.get("temperature", 1.0))
        out = pd.DataFrame(p, columns=c["classes"])
        out["malignant_probability"] = out[c["malignant"]].sum(1)
        out["label"] = [c["classes"][k] for k in decide(logits, adjustment_offsets(c))]
        return out


mlflow.models.set_model(ClassifierModel())
