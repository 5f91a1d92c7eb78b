"""The evaluation's words: the model card (markdown) and the HTML report, from ``evaluate``'s result dict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from components.step_report import kv, table, write_html

DISCLAIMER = (
    "DrSpot is a decision-support tool for trained clinicians. It does not diagnose. A low-risk answer does not rule "
    "out skin cancer; any lesion that changes, bleeds, itches or worries the patient must be seen by a dermatologist."
)


def _fmt(result: dict, key: str) -> str:
    v, (lo, hi) = result["metrics"][key], result["intervals_95"][key]
    return f"{v:.3f} (95% CI {lo:.3f}-{hi:.3f})"


def model_card(r: dict[str, Any]) -> str:
    keys = (
        "accuracy",
        "balanced_accuracy",
        "macro_auc",
        "kappa",
        "malignant_auc",
        "malignant_sensitivity",
        "malignant_specificity",
    )
    lines = [
        f"# Model card: DrSpot classifier ({r['backbone']} @ {r['input_size']} px)",
        "",
        "## Intended use",
        "Second-reader support for clinicians looking at dermoscopic images of a single skin lesion: it proposes one "
        f"of {', '.join(r['classes'])} and a malignancy probability (malignant: {', '.join(r['malignant'])}). "
        "Not for use by patients alone, not for non-dermoscopic photos, not a diagnosis.",
        "",
        "## Data",
        f"Data version (DVC md5 of data/): `{r['data_version']}`. Test set: {r['test_images']} images "
        f"({r['test_crops']} lesion crops) of the frozen test split; "
        "no lesion or duplicate of it was seen in training.",
        "",
        "## Metrics on the frozen test split (bootstrap 95% intervals)",
        *[f"- {k}: {_fmt(r, k)}" for k in keys],
        f"- malignant threshold {r['malignant_threshold']:.3f}, chosen on validation for sensitivity >= "
        f"{r['target_sensitivity']} (`evaluate.malignant_target_sensitivity`); at it on the test split: sensitivity "
        f"{_fmt(r, 'malignant_sensitivity')}, specificity {_fmt(r, 'malignant_specificity')}",
        f"- temperature {r['temperature']:.2f}; ECE {r['ece_after']:.3f} (uncalibrated {r['ece_before']:.3f})",
        f"- answered class: argmax of the logits - {r['logit_adjustment']['tau']:g} x log(training class share) "
        f"(`classifier.logit_adjustment`, chosen on validation); test balanced accuracy "
        f"{r['metrics']['balanced_accuracy']:.3f} (plain argmax "
        f"{r['logit_adjustment']['test_balanced_accuracy_plain_argmax']:.3f})",
        "",
        "## Limitations",
        "- Trained from scratch unless stated; small or synthetic training sets give wide intervals (see above).",
        "- Performance falls under blur, noise, exposure and compression (robustness table in the report).",
        "- Slices with few images are not reported; skin types and devices absent from training are untested.",
        "",
        "## Disclaimer",
        DISCLAIMER,
    ]
    return "\n".join(lines) + "\n"


def report_html(out_dir: Path, r: dict[str, Any]) -> None:
    """The evaluation's report.html: figures, per class, plots, calibration, slices, robustness, Grad-CAM."""
    imgs = "".join(
        f"<figure style='display:inline-block'><img src='gradcam/{n}'><figcaption>{n}</figcaption></figure>"
        for n in r["gradcam"]
    )
    metrics_rows = [
        {"metric": k, "value": v, "ci_low": r["intervals_95"][k][0], "ci_high": r["intervals_95"][k][1]}
        for k, v in r["metrics"].items()
    ]
    cx = [{"model": k, **{kk: vv for kk, vv in v.items() if kk != "test_metrics"}} for k, v in r["complexity"].items()]
    write_html(
        out_dir / "report.html",
        "DrSpot evaluation (frozen test split)",
        [
            ("Metrics with bootstrap 95% intervals", table(metrics_rows)),
            ("Per class", table(r["per_class"])),
            ("Plots", "<img src='plots/confusion_matrix.png'> <img src='plots/curves.png' style='max-width:100%'>"),
            (
                "Calibration",
                kv(
                    {
                        "temperature": r["temperature"],
                        "ECE before": r["ece_before"],
                        "ECE after": r["ece_after"],
                        "malignant threshold": r["malignant_threshold"],
                    }
                ),
            ),
            ("Slices", table(r["slices"])),
            ("Robustness (corrupted test crops)", table(r["robustness"])),
            ("Complexity", table(cx)),
            ("Grad-CAM (correct, then wrong)", imgs or "<p><em>none</em></p>"),
            ("Model card", f"<pre>{model_card(r)}</pre>"),
        ],
    )
