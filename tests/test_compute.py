"""The data steps' per-image work on a Dask cluster (infra/compute.py): an external `dask scheduler` and
`dask worker` processes, started and stopped here by process id; the outputs byte-identical to local processes."""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from components.data import gate
from components.data.ingest import ingest
from infra import compute
from serving.launch import free_port


def _with_compute(cfg, **values):
    return cfg.model_copy(update={"compute": cfg.compute.model_copy(update=values)})


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory):
    """`dask scheduler` + `dask worker --nworkers 2`, each its own process group; yields the scheduler address."""
    with compute.ExternalCluster(2, tmp_path_factory.mktemp("dask")) as cluster:
        yield cluster.address


def _tasks_seen(address: str) -> dict[str, int]:
    """Tasks finished per key prefix on the scheduler (what ran on the cluster)."""
    from distributed import Client

    def count(dask_scheduler):
        # state_counts counts every entry into a state: "memory" once per task that finished with its result
        return {name: p.state_counts.get("memory", 0) for name, p in dask_scheduler.task_prefixes.items()}

    with Client(address, timeout="20s") as client:
        return client.run_on_scheduler(count)


def test_the_data_gate_on_dask_writes_the_same_bytes_in_chunks(
    tmp_path, cfg, synthetic_source, dask_cluster, monkeypatch
):
    ds = tmp_path / "ds"
    ingest("synthetic", synthetic_source, ds, cfg)
    monkeypatch.delenv(compute.ADDRESS_ENV, raising=False)
    local = tmp_path / "local"
    for step in (gate.run_validate, gate.run_dedup, gate.run_split):
        step(ds, local, cfg)

    small = _with_compute(cfg, chunk_size=16)
    monkeypatch.setenv(compute.ADDRESS_ENV, dask_cluster)
    assert (
        compute.target(small).describe() == f"the Dask cluster at {dask_cluster} (DRSPOT_DASK_ADDRESS={dask_cluster})"
    )
    on_dask = tmp_path / "dask"
    before = _tasks_seen(dask_cluster)
    gate.run_validate(ds, on_dask, small)
    after = _tasks_seen(dask_cluster)
    gate.run_dedup(ds, on_dask, small)
    gate.run_split(ds, on_dask, small)

    for out in ("validate/validated.parquet", "dedup/deduplicated.parquet", "split/split.parquet"):
        assert (on_dask / out).read_bytes() == (local / out).read_bytes(), out
    # the images were checked on the cluster in chunks of 16: one task per chunk, not one per image
    rows = pq.read_metadata(ds / "manifest.parquet").num_rows
    assert after.get("run_chunk", 0) - before.get("run_chunk", 0) == -(-rows // 16)
    assert rows > 50


def test_ten_thousand_jobs_go_to_the_cluster_in_chunks(dask_cluster, cfg, monkeypatch):
    """Inputs far above what Prefect accepts as a flow's parameters (512 kB): 10^4 jobs of 200 characters."""
    monkeypatch.setenv(compute.ADDRESS_ENV, dask_cluster)
    jobs = [f"{i:06d}" + "x" * 194 for i in range(10_000)]
    cfg = cfg.model_copy(update={"compute": cfg.compute.model_copy(update={"chunk_size": 100})})
    before = _tasks_seen(dask_cluster)
    with _MostHeld(dask_cluster) as held:
        assert compute.map_chunks(len, jobs, cfg) == [200] * 10_000
    assert _tasks_seen(dask_cluster)["run_chunk"] - before.get("run_chunk", 0) == 100
    # the scheduler never held more than a window of chunks (2 per worker thread), not all 100: its memory does
    # not grow with the data set
    assert 0 < held.most <= 4, held.most


def test_cheap_jobs_go_in_larger_chunks_and_small_inputs_still_reach_every_worker(dask_cluster, cfg, monkeypatch):
    """The near-duplicate verification passes compute.pair_chunk_size (pairs are ~10x cheaper than images): fewer
    tasks, so less scheduler state per run; an input smaller than two chunks per worker thread is split anyway."""
    monkeypatch.setenv(compute.ADDRESS_ENV, dask_cluster)
    jobs = list(range(10_000))

    def tasks(n: int, **kw) -> int:
        before = _tasks_seen(dask_cluster).get("run_chunk", 0)
        assert compute.map_chunks(abs, jobs[:n], cfg, **kw) == jobs[:n]
        return _tasks_seen(dask_cluster)["run_chunk"] - before

    assert cfg.compute.pair_chunk_size == 5000 and cfg.compute.chunk_size == 500
    assert tasks(10_000) == 20  # images: chunks of 500
    assert tasks(10_000, chunk_size=cfg.compute.pair_chunk_size) == 2 * 2  # 2 worker threads: 4 chunks of 2,500
    assert tasks(100, chunk_size=cfg.compute.pair_chunk_size) == 4  # 25 each, not one chunk for one worker


class _MostHeld:
    """The most chunk tasks the scheduler held at once (its state polled every 20 ms from a thread)."""

    def __init__(self, address: str) -> None:
        import threading

        from distributed import Client

        self.client, self.most, self.stop = Client(address, timeout="20s"), 0, threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        def held(dask_scheduler):
            return sum(1 for k in dask_scheduler.tasks if str(k).startswith("run_chunk-"))

        while not self.stop.wait(0.02):
            self.most = max(self.most, self.client.run_on_scheduler(held))

    def __enter__(self) -> _MostHeld:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.client.close()


def _decodes(path: Path) -> bool:
    from components.data.images import ImageError, decode

    try:
        decode(path)
        return True
    except ImageError:
        return False


def test_the_monitoring_reference_on_dask_equals_the_local_one(
    tmp_path, cfg, synthetic_source, dask_cluster, monkeypatch
):
    import numpy as np
    import timm

    from components.data.manifest import read_manifest
    from components.monitoring import reference

    ds = tmp_path / "ds"
    ingest("synthetic", synthetic_source, ds, cfg)
    rows = [r for r in read_manifest(ds).to_pylist() if _decodes(ds / r["path"])][:40]
    model = timm.create_model("resnet18", pretrained=False, num_classes=7).eval()
    mc = {"crop_margin": 0.1, "input_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3, "classes": list("abcdefg")}
    monkeypatch.delenv(compute.ADDRESS_ENV, raising=False)
    local, _ = reference.build(model, mc, rows[:30], ds, val_rows=rows[30:], cfg=cfg)
    monkeypatch.setenv(compute.ADDRESS_ENV, dask_cluster)
    on_dask, _ = reference.build(model, mc, rows[:30], ds, val_rows=rows[30:], cfg=_with_compute(cfg, chunk_size=8))
    assert list(on_dask.columns) == list(local.columns) and len(on_dask) == 40
    for col in local.columns:
        if local[col].dtype.kind == "f":
            np.testing.assert_array_equal(on_dask[col].to_numpy(), local[col].to_numpy(), err_msg=col)
        else:
            assert on_dask[col].tolist() == local[col].tolist(), col


def test_a_scheduler_that_does_not_answer_fails_fast_naming_the_setting(tmp_path, cfg, synthetic_source, monkeypatch):
    from components.data.validate import SUMMARY, VALIDATED

    ds = tmp_path / "ds"
    ingest("synthetic", synthetic_source, ds, cfg)
    dead = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv(compute.ADDRESS_ENV, dead)
    start = time.monotonic()
    with pytest.raises(compute.ComputeError, match=f"DRSPOT_DASK_ADDRESS={dead}.* did not answer within 2 s"):
        gate.run_validate(ds, tmp_path / "prep", _with_compute(cfg, connect_timeout_s=2))
    assert time.monotonic() - start < 15
    out = tmp_path / "prep" / "validate"
    assert not (out / VALIDATED).exists()  # nothing half-written: no manifest that looks complete
    assert "did not answer" in (out / SUMMARY).read_text()

    # the same from params, named as the params key
    monkeypatch.delenv(compute.ADDRESS_ENV)
    with pytest.raises(compute.ComputeError, match=r"compute.dask_address=.* in params did not answer"):
        compute.map_chunks(abs, [1, 2], _with_compute(cfg, dask_address=dead, connect_timeout_s=1))


def test_the_cli_says_which_setting_points_at_a_dead_scheduler(tmp_path, drspot_cli, cfg, synthetic_source):
    from tests.conftest import shell_env

    ds = tmp_path / "ds"
    ingest("synthetic", synthetic_source, ds, cfg)
    dead = f"127.0.0.1:{free_port()}"
    env = shell_env(
        DRSPOT_HOME=str(tmp_path / "home"), DRSPOT_DASK_ADDRESS=dead, DRSPOT_SET="compute.connect_timeout_s=2"
    )
    r = drspot_cli("--profile", "test", "validate", str(ds), "--prepared", str(tmp_path / "prep"), env=env)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"DRSPOT_DASK_ADDRESS={dead} did not answer" in r.stderr and "did not answer within 2 s" in r.stderr
