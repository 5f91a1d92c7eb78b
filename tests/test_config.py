"""The typed configuration: profiles, rejection of unknown keys and wrong types, the CLI print."""

from __future__ import annotations

import json

import pytest
import yaml

from infra.config import PROFILES, ConfigError, load_config
from tests.conftest import ROOT


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_loads(profile):
    cfg = load_config(profile)
    assert cfg.profile == profile
    assert cfg.classes.names == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert set(cfg.classes.malignant) == {"mel", "bcc", "akiec"}


def test_profile_overrides_only_what_it_names():
    demo, test = load_config("demo"), load_config("test")
    assert test.synthetic.n_lesions < demo.synthetic.n_lesions
    assert test.synthetic.jpeg_quality == demo.synthetic.jpeg_quality  # not named by `test`
    assert test.digest() != demo.digest()


def _write(tmp_path, mutate):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    mutate(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_unknown_key_is_rejected_with_its_name(tmp_path):
    path = _write(tmp_path, lambda r: r["default"]["synthetic"].update(n_lesion=3))
    with pytest.raises(ConfigError, match=r"unknown key 'synthetic\.n_lesion'"):
        load_config("demo", path)


def test_unknown_key_in_a_profile_is_rejected_with_its_name(tmp_path):
    path = _write(tmp_path, lambda r: r.update(test={"synthetic": {"widht": 3}}))
    with pytest.raises(ConfigError, match=r"profile test.*unknown key 'synthetic\.widht'"):
        load_config("test", path)


def test_wrong_type_is_rejected_with_its_name(tmp_path):
    path = _write(tmp_path, lambda r: r["default"]["synthetic"].update(width="wide"))
    with pytest.raises(ConfigError, match=r"key 'synthetic\.width'.*'wide'"):
        load_config("demo", path)


def test_malignant_class_outside_names_is_rejected(tmp_path):
    path = _write(tmp_path, lambda r: r["default"]["classes"].update(malignant=["mel", "scc"]))
    with pytest.raises(ConfigError, match=r"malignant.*scc"):
        load_config("demo", path)


def test_unknown_profile_lists_the_choices():
    with pytest.raises(ConfigError, match="choose one of: demo, test, full"):
        load_config("nightly")


def test_label_normalisation():
    classes = load_config("demo").classes
    assert classes.normalise(" MEL ") == "mel"
    assert classes.normalise("AK") == "akiec"
    assert classes.normalise("SCC") == "SCC"  # kept as given for the data gate to quarantine
    assert classes.normalise("") is None


def test_cli_prints_the_resolved_config(drspot_cli):
    out = drspot_cli("config", "--profile", "test", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["synthetic"]["n_lesions"] == load_config("test").synthetic.n_lesions
    out = drspot_cli("config", "--profile", "demo")
    digest = load_config("demo").digest()
    assert out.stdout.startswith(f"# DrSpot resolved configuration: profile demo, digest {digest}")


def test_a_resolved_configuration_is_taken_as_it_is(tmp_path, monkeypatch, drspot_cli):
    from infra.config import load_resolved

    monkeypatch.setenv("DRSPOT_SET", "monitor.last=77")
    cfg = load_config("test")
    path = cfg.write(tmp_path / "run" / "config.yaml")
    assert not list(path.parent.glob(".*.tmp"))  # written whole, through a temporary file
    monkeypatch.setenv("DRSPOT_SET", "monitor.last=5")  # a later override does not re-resolve a resolved file
    again = load_resolved(path)
    assert again == cfg and again.digest() == cfg.digest() and again.monitor.last == 77
    out = drspot_cli("--config", str(path), "config", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["monitor"]["last"] == 77
    out = drspot_cli("--config", str(path), "--profile", "demo", "config")
    assert out.returncode == 2 and "give it without --profile/--params" in out.stderr


@pytest.mark.parametrize(
    "args,env,message",
    [
        (["--profile", "nope", "status"], {}, "unknown profile 'nope'"),
        (["status"], {"DRSPOT_PROFILE": "nope"}, "unknown profile 'nope'"),
        (["status"], {"DRSPOT_SET": "classifier.epoch=3"}, "unknown key 'classifier.epoch'"),
        (["--config", "/nonexistent/config.yaml", "status"], {}, "resolved configuration not found"),
    ],
)
def test_a_bad_setting_is_named_before_any_work(drspot_cli, tmp_path, args, env, message):
    import os

    home = tmp_path / "home"
    out = drspot_cli(*args, env={**os.environ, "DRSPOT_HOME": str(home), **env})
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert out.stderr.startswith("drspot status: error:") and not home.exists()  # refused before anything was made


def test_cli_reports_a_bad_params_file(drspot_cli, tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("default: [1, 2\n")
    out = drspot_cli("--params", str(bad), "config")
    assert out.returncode == 2
    assert "is not valid YAML" in out.stderr


def test_drspot_set_overrides_keys_after_the_profile_and_rejects_unknown_ones(monkeypatch):
    monkeypatch.setenv("DRSPOT_SET", "serving.store_images=true; monitor.last=500")
    cfg = load_config("test")
    assert cfg.serving.store_images is True and cfg.monitor.last == 500
    assert cfg.classifier.epochs == 1  # the profile still applies
    monkeypatch.setenv("DRSPOT_SET", "serving.store_image=true")
    with pytest.raises(ConfigError, match="DRSPOT_SET='serving.store_image=true': unknown key 'serving.store_image'"):
        load_config("test")
    monkeypatch.setenv("DRSPOT_SET", "monitor.last")
    with pytest.raises(ConfigError, match="'monitor.last' is not key.path=value"):
        load_config("test")


def test_a_configuration_resolved_before_the_front_limits_existed_still_loads(tmp_path):
    """A Bento deployed by an earlier DrSpot recorded its resolved configuration without `serving.max_inflight` and
    `serving.body_timeout_s`: `drspot serve` still serves it, with the limits' defaults."""
    import yaml

    from infra.config import load_resolved

    old = load_config("test").as_dict()
    for key in ("max_inflight", "body_timeout_s"):
        old["serving"].pop(key)
    path = tmp_path / "deployed-config.yaml"
    path.write_text(yaml.safe_dump(old))
    cfg = load_resolved(path)
    assert (cfg.serving.max_inflight, cfg.serving.body_timeout_s) == (64, 30)
