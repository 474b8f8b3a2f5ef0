"""docs/configuration.md is generated from the settings classes and must match them."""

from __future__ import annotations

from control_plane.config import Settings
from edge_agent.settings import AgentSettings
from slmops.cli import config_docs


def test_committed_configuration_doc_matches_the_settings_classes() -> None:
    committed = config_docs.DOC_PATH.read_text(encoding="utf-8")
    assert committed == config_docs.render(), "docs/configuration.md is stale: run python -m slmops.cli.config_docs"


def test_check_mode_reports_a_stale_file(tmp_path) -> None:
    stale = tmp_path / "configuration.md"
    stale.write_text(config_docs.render().replace("SLMOPS_DATA_DIR", "SLMOPS_DATA_DIRECTORY"), encoding="utf-8")
    assert config_docs.main(["--check", "--out", str(stale)]) == 1
    assert config_docs.main(["--out", str(stale)]) == 0
    assert config_docs.main(["--check", "--out", str(stale)]) == 0


def test_every_field_has_its_variable_default_and_a_meaning() -> None:
    for cls, prefix in ((Settings, "SLMOPS_"), (AgentSettings, "SLMOPS_AGENT_")):
        rows = {name: row for name, *row in config_docs.settings_rows(cls)}
        assert set(rows) == set(cls.model_fields)
        for name, (env, _kind, default, meaning) in rows.items():
            assert env == prefix + name.upper()
            assert default, f"{cls.__name__}.{name} renders no default"
            described = cls.model_fields[name].description
            assert described and meaning, f"{cls.__name__}.{name} has no description: give it Field(description=...)"


def test_descriptions_come_from_the_fields() -> None:
    rows = {name: row for name, *row in config_docs.settings_rows(Settings)}
    described = Settings.model_fields["mqtt_url"].description
    assert described and described.rstrip(".") in rows["mqtt_url"][3]
    assert rows["max_upload_bytes"][2] == "`8589934592` (8 GiB)"
    assert rows["mqtt_protocol"][1].startswith("`3.1.1`")
