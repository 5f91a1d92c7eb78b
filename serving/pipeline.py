"""The two-stage analysis, in process: detector -> lesion crops -> classifier, with a fail-safe.

The same object serves the BentoML endpoint and the benchmark's "raw" baseline. Crops use
:func:`components.data.preprocess.to_uint8` with the margin the classifier was trained with, so serving
cannot drift from training. When the detector finds no box above its confidence threshold, is not
loaded, or raises, the whole image is classified and the answer says so (``fallback``).
"""

from __future__ import annotations

import json
import threading
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from components.model.metrics import adjustment_offsets, decide, softmax
from components.model.model_card import DISCLAIMER
from components.monitoring.reference import embed
from infra.config import Config
from serving.threads import model_threads, one_thread

KNOWLEDGE = Path(__file__).parent / "knowledge" / "guidance.yaml"
PREPROCESS = ("none", "color_constancy", "clahe")


# --- illumination / contrast correction ---------------------------------------------------------


CC_ROWS = 256  # rows of a photo colour constancy works on at a time
QUALITY_KEYS = ("blur_min", "brightness_min", "brightness_max", "low_resolution_side")  # calibrated per classifier


def color_constancy(rgb: Image.Image, power: int = 6) -> Image.Image:
    """Shades-of-Grey colour constancy (Minkowski p-norm; the usual correction for dermoscopy).

    Computed in float32 in bands of :data:`CC_ROWS` rows: the work arrays are a band's, not the photo's (a 40 MP photo
    took ~3 GB of float64 copies at once; now its uint8 copy plus a few MB), on the working picture
    (``serving.work_side``)."""
    a = np.asarray(rgb)
    h = a.shape[0]
    total = np.zeros(3)
    for top in range(0, h, CC_ROWS):  # float32 work (255**6 ~ 2.7e14 is well inside it), sums kept in float64
        total += np.power(a[top : top + CC_ROWS].astype(np.float32), power).sum(axis=(0, 1), dtype=np.float64)
    illum = np.power(total / (h * a.shape[1]), 1 / power)
    illum = illum / (np.linalg.norm(illum) + 1e-9)
    gain = (1 / (illum * np.sqrt(3) + 1e-9)).astype(np.float32)
    out = np.empty_like(a)
    for top in range(0, h, CC_ROWS):
        out[top : top + CC_ROWS] = np.clip(a[top : top + CC_ROWS] * gain, 0, 255).astype(np.uint8)
    return Image.fromarray(out)


def clahe(rgb: Image.Image, clip: float = 2.0, tiles: int = 8) -> Image.Image:
    """Contrast-limited adaptive histogram equalisation on the lightness channel (LAB)."""
    import cv2

    lab = cv2.cvtColor(np.asarray(rgb), cv2.COLOR_RGB2LAB)
    lab[..., 0] = cv2.createCLAHE(clipLimit=clip, tileGridSize=(tiles, tiles)).apply(lab[..., 0])
    return Image.fromarray(cv2.cvtColor(lab, cv2.COLOR_LAB2RGB))


def correct(rgb: Image.Image, how: str) -> Image.Image:
    if how == "color_constancy":
        return color_constancy(rgb)
    if how == "clahe":
        return clahe(rgb)
    return rgb


# --- the knowledge base -------------------------------------------------------------------------


RISKS = ("low", "medium", "high")


class KnowledgeError(ValueError):
    """The knowledge base lacks an entry or a citation (what and where)."""


def _at(kb: dict[str, Any], path: str) -> Any:
    """The knowledge base's entry at a dotted ``path`` (``classes.mel.vi``), or None."""
    node: Any = kb
    for part in path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _original(path: str, origin: str) -> str:
    """The entry a translation at ``path`` translates: the same entry in the ``origin`` language."""
    return f"{path.rsplit('.', 1)[0]}.{origin}"


def check_knowledge(kb: dict[str, Any], classes: list[str] | tuple[str, ...]) -> list[str]:
    """What is wrong with a knowledge base: every class x language and risk x language entry, and the fallback note
    in every language, must exist with its text and cite its source: an English entry the references it names
    (``references``), a translation an existing entry of the language it was translated from. Empty when sound."""
    problems: list[str] = []
    langs = kb.get("languages") or []
    refs = kb.get("references") or {}
    translations = kb.get("translations") or {}

    def cited(path: str, value: Any, lang: str) -> None:
        src = value.get("source") if isinstance(value, dict) else None
        origin = (translations.get(lang) or {}).get("from")
        if not src:
            problems.append(f"{path}: cites no source")
        elif origin:  # a translation cites the entry it translates
            want = _original(path, origin)
            if src != want or _at(kb, want) is None:
                problems.append(f"{path}: a translation from {origin} must cite {want} (cites {src!r})")
        else:
            for ref in [src] if isinstance(src, str) else src:
                if ref not in refs:
                    problems.append(f"{path}: cites {ref!r}, which is not in references")

    for lang in langs:
        if lang not in translations:
            problems.append(f"translations.{lang}: the language's origin and review state are missing")
    for c in classes:
        for lang in langs:
            path = f"classes.{c}.{lang}"
            value = _at(kb, path)
            missing = [k for k in ("name", "about") if not (isinstance(value, dict) and value.get(k))]
            if value is None or missing:
                problems.append(f"{path}: missing" + (f" ({', '.join(missing)})" if value is not None else ""))
                continue
            cited(path, value, lang)
    for part in [f"risk.{r}" for r in RISKS] + ["fallback"]:
        for lang in langs:
            path = f"{part}.{lang}"
            value = _at(kb, path)
            if not (isinstance(value, dict) and value.get("text")):
                problems.append(f"{path}: missing")
                continue
            cited(path, value, lang)
    return problems


@lru_cache(maxsize=1)
def knowledge() -> dict[str, Any]:
    """The knowledge base, checked (:func:`check_knowledge` over the classes it lists): a gap refuses to load."""
    import yaml

    kb = yaml.safe_load(KNOWLEDGE.read_text(encoding="utf-8"))
    problems = check_knowledge(kb, list(kb.get("classes") or {}))
    if problems:
        raise KnowledgeError(f"{KNOWLEDGE}: " + "; ".join(problems))
    return kb


def resolve_language(tag: str | None, default: str) -> str:
    """A request's language: ``ko``, ``KO`` or ``ko-KR`` (its primary subtag) when the knowledge base has it.

    Raises:
        KnowledgeError: a language it does not have, naming those it has.
    """
    langs = knowledge()["languages"]
    raw = (tag or default).strip()
    primary = raw.replace("_", "-").split("-")[0].lower()
    if primary not in langs:
        raise KnowledgeError(f"language={raw!r} is not offered; use one of {', '.join(langs)}")
    return primary


def guidance(label: str | None, risk: str | None, language: str, fallback: bool) -> dict[str, Any]:
    """Care guidance from the curated knowledge base only, with the entries it came from and their review state;
    says plainly when it has none."""
    kb = knowledge()
    entry = kb["classes"].get(label or "", {}).get(language)
    advice = kb["risk"].get(risk or "", {}).get(language)
    if entry is None or advice is None:
        missing = f"language '{language}'" if language not in kb["languages"] else f"class '{label}'"
        return {
            "language": language,
            "text": None,
            "source": None,
            "note": f"the knowledge base has no guidance for {missing}; available languages: "
            f"{', '.join(kb['languages'])}",
        }
    text = f"{entry['name']}: {entry['about']} {advice['text']}"
    used = [f"classes.{label}.{language}", f"risk.{risk}.{language}"]
    if fallback:
        text += " " + kb["fallback"][language]["text"]
        used.append(f"fallback.{language}")
    origin = kb["translations"][language]["from"]
    cites = sorted({r for u in used for r in _references(kb, _original(u, origin) if origin else u)})
    return {
        "language": language,
        "label": label,
        "risk": risk,
        "text": text,
        "source": f"knowledge base v{kb['version']}: {' + '.join(used)}"
        + (f" (translated from {origin})" if origin else ""),
        "references": [kb["references"][r] for r in cites],
        "review": kb["translations"][language]["review"],
    }


def _references(kb: dict[str, Any], path: str) -> list[str]:
    src = _at(kb, path)["source"]
    return [src] if isinstance(src, str) else list(src)


# --- the pipeline -------------------------------------------------------------------------------


class Pipeline:
    """Both models loaded from their folders (as registered: weights + config)."""

    def __init__(
        self,
        classifier_dir: str | Path,
        detector_dir: str | Path | None,
        cfg: Config,
        versions: dict[str, str] | None = None,
    ) -> None:
        self.cfg = cfg
        self.versions = versions or {"classifier": str(classifier_dir), "detector": str(detector_dir)}
        # the models' intra-op threads, given to the thread of each model call (use_threads); the models load on one
        # thread, so that the thread building the pipeline starts no OpenMP team beside the model thread's
        # (serving/threads.py: two teams made the service's eager PyTorch 2.5x slower)
        self.threads = model_threads(cfg.serving)
        with one_thread():
            self._load(Path(classifier_dir), detector_dir)
        s = cfg.serving
        self.conf = s.detector_conf if s.detector_conf is not None else float(self.dc.get("conf", 0.25))
        # the quality-warning limits in force: calibrated on this classifier's training images when it has them
        limits = self.mc.get("quality_limits") if s.quality_limits == "calibrated" else None
        self.serving = s.model_copy(update={k: limits[k] for k in QUALITY_KEYS if k in limits}) if limits else s
        self.quality_source = (
            f"calibrated: percentile {limits['percentile']:g} of {limits['images']} training images"
            if limits
            else "fixed (serving.blur_min / brightness_min / brightness_max)"
        )
        # out of distribution: the classifier's stored subspace, the threshold a quantile of its validation photos
        from components.monitoring import ood

        self.ood = ood.load(classifier_dir)
        self.ood_threshold = ood.threshold(self.ood, s.ood_quantile) if self.ood is not None else None
        self.ood_source = (
            f"quantile {s.ood_quantile:g} of {len(self.ood['val_scores'])} validation photos' scores"
            if self.ood is not None
            else "not available: this classifier was trained before OOD scores were stored (retrain to get them)"
        )

    def _load(self, classifier_dir: Path, detector_dir: str | Path | None) -> None:
        """The classifier (eager, or its ONNX export: ``serving.runtime``) and the detector if there is one; a
        detector that does not load leaves ``detector_error`` (the service then classifies whole images)."""
        from components.model.classifier import MODEL_CONFIG, load_model
        from serving import onnx_export

        # serving.runtime: eager PyTorch, or ONNX Runtime on the exports `drspot deploy` checked against PyTorch
        self.runtime = self.cfg.serving.runtime
        self.ort = None
        if self.runtime == "onnx":
            exported = Path(classifier_dir) / onnx_export.CLASSIFIER_ONNX
            if not exported.is_file():
                raise RuntimeError(
                    f"serving.runtime is onnx, but {classifier_dir} has no {onnx_export.CLASSIFIER_ONNX} (deployed "
                    "before ONNX exports, or its export was refused: see `drspot deploy`); deploy again or set "
                    "serving.runtime: torch"
                )
            self.ort = onnx_export.session(exported, self.threads)
            self.model, self.mc = None, json.loads((Path(classifier_dir) / MODEL_CONFIG).read_text())
        else:
            self.model, self.mc = load_model(classifier_dir)
        self.classes, self.malignant = self.mc["classes"], self.mc["malignant"]
        self.temperature = float(self.mc.get("temperature", 1.0))
        self.offsets = adjustment_offsets(self.mc)  # the answered class: argmax of the adjusted logits
        self.threshold = float(self.mc.get("malignant_threshold", 0.5))
        self.lock = threading.Lock()  # one model call at a time: two cores, no oversubscription
        self.detector, self.detector_error, self.dc = None, None, {}
        self.detector_session: str | None = None  # on ONNX Runtime: whose session the detector runs on
        if detector_dir is not None:
            try:
                from infra.env import ultralytics

                self.dc = json.loads((Path(detector_dir) / "detector_config.json").read_text())
                if self.runtime == "onnx":
                    exported = Path(detector_dir) / onnx_export.DETECTOR_ONNX
                    if not exported.is_file():
                        raise FileNotFoundError(f"serving.runtime is onnx, but {detector_dir} has no {exported.name}")
                    self.detector = ultralytics().YOLO(str(exported), task="detect")
                    self.detector_session = onnx_export.own_detector_session(
                        self.detector, exported, int(self.dc.get("imgsz", 128)), self.threads
                    )
                else:
                    self.detector = ultralytics().YOLO(str(Path(detector_dir) / "detector.pt"))
            except Exception as e:  # the service still answers, by whole-image classification
                self.detector_error = f"detector not loaded: {type(e).__name__}: {e}"
        else:
            self.detector_error = "no detector deployed"

    def use_threads(self) -> None:
        """Give the calling thread's PyTorch work :attr:`threads` intra-op threads. OpenMP keeps the count per thread:
        ``torch.set_num_threads`` in the main thread leaves a worker thread at OMP_NUM_THREADS (1 once ultralytics
        is imported), so each model call sets it for its own thread (measured: a 3x3 conv batch 0.99 s from a worker
        thread as it was, 0.53 s so).

        On ONNX Runtime the caller's only PyTorch work is ultralytics' steps around the detector's session: one
        thread, else its OpenMP team spins beside the sessions after every call (docs/benchmarks.md: 19.2 -> 11.5 CPU
        ms a photo in process)."""
        import torch

        torch.set_num_threads(self.threads if self.runtime == "torch" else 1)

    # stage 1
    def detect(self, images: list[Image.Image]) -> list[list[tuple[list[float], float]]]:
        """Boxes (normalised xyxy) and confidences above the threshold, per image. May raise."""
        if self.detector is None:
            raise RuntimeError(self.detector_error or "no detector")
        with self.lock:
            self.use_threads()
            results = self.detector.predict(
                images,
                imgsz=self.dc.get("imgsz", 128),
                conf=self.conf,
                iou=float(self.dc.get("iou", 0.5)),
                device="cpu",
                verbose=False,
            )
        out = []
        for r in results:
            boxes = r.boxes
            xyxyn = boxes.xyxyn.cpu().numpy().tolist() if len(boxes) else []
            conf = boxes.conf.cpu().numpy().tolist() if len(boxes) else []
            out.append(
                sorted(
                    (([round(v, 4) for v in b], round(float(c), 4)) for b, c in zip(xyxyn, conf, strict=True)),
                    key=lambda t: -t[1],
                )
            )
        return out

    # stage 2
    def classify(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Calibrated class probabilities (N, K), penultimate-layer embeddings (N, D) and the answered classes (N,):
        the argmax of the logits with the model's logit adjustment (metrics.decide)."""
        import torch

        from components.data.preprocess import normalise

        if self.ort is not None:
            x = np.ascontiguousarray(normalise(crops, self.mc["mean"], self.mc["std"]), dtype=np.float32)
            with self.lock:
                emb, logits = self.ort.run(None, {"input": x})
            return softmax(logits, self.temperature), emb, decide(logits, self.offsets)
        x = torch.from_numpy(normalise(crops, self.mc["mean"], self.mc["std"])).contiguous(
            memory_format=torch.channels_last
        )
        with self.lock, torch.no_grad():
            self.use_threads()
            emb, logits = embed(self.model, x, self.mc.get("tta", False))
        return softmax(logits.numpy(), self.temperature), emb.numpy(), decide(logits.numpy(), self.offsets)

    def risk(self, p_malignant: float) -> str:
        if p_malignant >= max(self.threshold, self.cfg.serving.high_risk_probability):
            return "high"
        if p_malignant >= self.threshold:
            return "medium"
        return "low"

    def locate(self, images: list[Image.Image]) -> list[tuple[list[tuple[Any, Any]], str | None]]:
        """Stage 1 with its fail-safe, per image: the (box, detector confidence) pairs to classify, and why the whole
        image is classified instead (then one ``(None, None)`` pair), or None when the detector found lesions."""
        try:
            found = self.detect(images)
            errors: list[str | None] = [None] * len(images)
        except Exception as e:
            found = [[] for _ in images]
            errors = [f"detector error: {type(e).__name__}: {e}"] * len(images)
        plans = []
        for boxes, err in zip(found, errors, strict=True):
            if err is None and not boxes:
                err = f"no lesion found above the detector's confidence threshold {self.conf:g}"
            plans.append((boxes if err is None else [(None, None)], err))
        return plans

    def lesions(
        self, images: list[Image.Image], plans: list[tuple[list[tuple[Any, Any]], str | None]]
    ) -> list[tuple[list[dict[str, Any]], list[float]]]:
        """Stage 2 over the planned crops in one classifier call, per image: its lesions (class, calibrated
        probabilities, malignant probability, risk, OOD score) and the embedding of its first crop."""
        from components.data.preprocess import to_uint8

        crops = [
            to_uint8(img, box, self.mc["crop_margin"], self.mc["input_size"])
            for img, (plan, _) in zip(images, plans, strict=True)
            for box, _ in plan
        ]
        probs, emb, answered = self.classify(np.stack(crops))
        if self.ood is not None:
            from components.monitoring import ood

            ood_scores = ood.score(emb, self.ood)
        else:
            ood_scores = [None] * len(emb)
        out, row = [], 0
        for plan, _ in plans:
            lesions, first = [], row
            for box, conf in plan:
                p = probs[row]
                pm = float(p[[self.classes.index(m) for m in self.malignant]].sum())
                lesions.append(
                    {
                        "box": box,
                        "detector_confidence": conf,
                        "label": self.classes[int(answered[row])],
                        "probabilities": {c: round(float(v), 5) for c, v in zip(self.classes, p, strict=True)},
                        "malignant_probability": round(pm, 5),
                        "risk": self.risk(pm),
                        "ood_score": None if ood_scores[row] is None else round(float(ood_scores[row]), 4),
                    }
                )
                row += 1
            out.append((lesions, emb[first].astype(float).round(5).tolist()))
        return out

    @staticmethod
    def result(
        lesions: list[dict[str, Any]], embedding: list[float], err: str | None, timings_ms: dict[str, float]
    ) -> dict[str, Any]:
        """One image's analysis as the service answers and logs it."""
        return {
            "lesions": lesions,
            "fallback": err is not None,
            "fallback_reason": err,
            "embedding": embedding,
            "timings_ms": timings_ms,
        }

    def analyse_many(self, images: list[Image.Image]) -> list[dict[str, Any]]:
        """Both stages over a batch of RGB images: one detector call, one classifier call."""
        t0 = time.perf_counter()
        plans = self.locate(images)
        t1 = time.perf_counter()
        scored = self.lesions(images, plans)
        t2 = time.perf_counter()
        timings = {
            "detector": round((t1 - t0) * 1000 / len(images), 2),
            "classifier": round((t2 - t1) * 1000 / len(images), 2),
        }
        return [
            self.result(lesions, emb, err, dict(timings))
            for (lesions, emb), (_, err) in zip(scored, plans, strict=True)
        ]

    def analyse(self, rgb: Image.Image, preprocess: str = "none") -> dict[str, Any]:
        return self.analyse_many([correct(rgb, preprocess)])[0]

    def answer(
        self,
        result: dict[str, Any],
        language: str | None = None,
    ) -> dict[str, Any]:
        """The parts of the response that come from the models' result: guidance and disclaimer."""
        lang = language or self.cfg.serving.language
        order = {"high": 2, "medium": 1, "low": 0}
        worst = max(result["lesions"], key=lambda les: (order[les["risk"]], les["malignant_probability"]))
        return {
            **self.abstention(result["lesions"], worst),
            "guidance": guidance(worst["label"], worst["risk"], lang, result["fallback"]),
            "disclaimer": DISCLAIMER,
            "thresholds": {
                "malignant": self.threshold,
                "high_risk": max(self.threshold, self.cfg.serving.high_risk_probability),
                "detector_confidence": self.conf,
                "ood": self.ood_threshold,
                "uncertain_below": self.cfg.serving.uncertain_below,
            },
        }

    def abstention(self, lesions: list[dict[str, Any]], reported: dict[str, Any]) -> dict[str, Any]:
        """Whether to hold back the class of the reported lesion (the one the guidance and the log's label are
        about): ``not_dermoscopic_lesion`` when its crop lies beyond the OOD threshold, ``uncertain`` when its top
        calibrated probability is below ``serving.uncertain_below``, else None. The probabilities stay in the
        answer either way, and every lesion keeps its own ``ood_score``."""
        ood_score = reported.get("ood_score")
        top = max(reported["probabilities"].values())
        if ood_score is not None and ood_score > self.ood_threshold:
            abstain = "not_dermoscopic_lesion"
            why = (
                f"the photo lies outside what the classifier was trained on (OOD score {ood_score:.2f} > "
                f"{self.ood_threshold:.2f}); its classes are not a reliable reading of this photo"
            )
        elif top < self.cfg.serving.uncertain_below:
            abstain = "uncertain"
            why = (
                f"the most likely class has probability {top:.2f}, below {self.cfg.serving.uncertain_below:g}: "
                "no class is likely enough to report; have a clinician look"
            )
        else:
            abstain, why = None, None
        return {"ood_score": ood_score, "abstain": abstain, "abstain_reason": why}
