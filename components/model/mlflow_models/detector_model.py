"""MLflow pyfunc for a DrSpot detector: artifacts ``model_dir`` (detector.pt + detector_config.json).

Input: a DataFrame with column ``image`` (encoded image bytes). Output: one row per box found
above the configured confidence: ``row`` (input index), ``x_min, y_min, x_max, y_max``
(normalised), ``confidence``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

import mlflow


class DetectorModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from infra.env import ultralytics

        d = Path(context.artifacts["model_dir"])
        self.config = json.loads((d / "detector_config.json").read_text())
        self.model = ultralytics().YOLO(str(d / "detector.pt"))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        import numpy as np

        from components.data.images import decode

        rows = []
        for k, img in enumerate(model_input["image"]):
            rgb = np.asarray(decode(bytes(img)).rgb)
            res = self.model.predict(
                rgb,
                imgsz=self.config["imgsz"],
                conf=self.config["conf"],
                iou=self.config["iou"],
                verbose=False,
                device="cpu",
            )[0]
            for (x0, y0, x1, y1), conf in zip(res.boxes.xyxyn.tolist(), res.boxes.conf.tolist(), strict=True):
                rows.append({"row": k, "x_min": x0, "y_min": y0, "x_max": x1, "y_max": y1, "confidence": conf})
        return pd.DataFrame(rows, columns=["row", "x_min", "y_min", "x_max", "y_max", "confidence"])


mlflow.models.set_model(DetectorModel())
