"""``drspot demo``: the loop on the embedded defaults, start to finish, on one machine.

Today: generate a synthetic dataset with planted faults, ingest it into ``data/``, version it with
DVC (``dvc add`` + push to the local remote), run the data gate (the ``prepare`` Prefect flow over
the DVC stages validate -> dedup -> split) and print a summary. Later stages are added here as
they land (train, register, serve, monitor, retrain).
"""

from __future__ import annotations

import time
from pathlib import Path

from components.config import Config
from components.env import project_root


def _step(n: int, title: str) -> float:
    print(f"\n== [{n}] {title}", flush=True)
    return time.monotonic()


def run_demo(cfg: Config) -> int:
    from components import versioning
    from components.ingest import ingest
    from flows.cli import _progress, report_rows

    root = project_root()
    raw = cfg.resolve(cfg.paths.raw) / "synthetic"
    data = cfg.resolve(cfg.paths.data)
    t0 = _step(1, f"generate + ingest a synthetic dataset with planted faults -> {data.relative_to(root)}")
    result = ingest("synthetic", raw, data, cfg, generate=True, progress=_progress("ingest"))
    report_rows(result, 5)
    print(f"   faults planted (listed in {raw.relative_to(root)}/faults.json) for the data gate to catch")
    print(f"   took {time.monotonic() - t0:.1f}s")

    t0 = _step(2, "version the dataset with DVC")
    version = versioning.add(data.relative_to(root), cwd=root)
    versioning.push(root)
    print(f"   data.dvc -> md5 {version} (pushed to the default DVC remote)")
    print(f"   took {time.monotonic() - t0:.1f}s")

    t0 = _step(3, "data gate: the `prepare` Prefect flow runs the DVC stages validate -> dedup -> split")
    from components import gate
    from flows.prepare import prepare_flow

    gated = prepare_flow(str(data), profile=cfg.profile)
    print(gate.markdown(Path(gated["prepared"]), data.relative_to(root)))
    print(f"   stages: {gated['steps']} (a re-run on unchanged data is cached by DVC)")
    print(f"   reports: {gated['prepared']}/{{validate,dedup,split}}/*.html|json")
    print(f"   took {time.monotonic() - t0:.1f}s")

    print("\n== summary")
    print(f"   dataset  {data}  ({result.rows} images, {result.summary['lesions']} lesions)")
    print(f"   version  {version}")
    print(f"   report   {data / 'ingest_report.json'}")
    print(f"   gate     {gated['rows_valid']} valid rows -> {gated['rows_per_split']}, leakage {gated['leakage']}")
    print("   Prefect UI: .venv/bin/prefect server start  (then open http://127.0.0.1:4200)")
    return 0
