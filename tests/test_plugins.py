import json

from conftest import sarkit

from sarkit import plugins, sensors


def _listed(env=None):
    proc = sarkit("plugins", "--json", env=env, check=0)
    return {json.loads(line)["name"]: json.loads(line) for line in proc.stdout.splitlines()}


def test_builtins_register_through_the_manager():
    listed = _listed()
    assert listed["sarkit.sensors.builtin"]["source"] == "built-in"
    assert "sarkit_sensors" in listed["sarkit.sensors.builtin"]["hooks"]
    assert "sarkit_slice" in listed["sarkit.raster.plugin"]["hooks"]


def test_entry_point_plugin_is_discovered():
    listed = _listed()
    assert "iceye" in listed, "plugins/sarkit-iceye is installed by `make setup`"
    assert listed["iceye"]["source"].startswith("entry point sarkit_iceye")
    assert listed["iceye"]["hooks"] == ["sarkit_sensors"]


def test_env_var_disables_third_party_plugins():
    assert "iceye" not in _listed({"SARKIT_DISABLE_PLUGINS": "1"})
    assert "iceye" not in _listed({"SARKIT_DISABLE_PLUGINS": "iceye,other"})
    assert "sarkit.sensors.builtin" in _listed({"SARKIT_DISABLE_PLUGINS": "all"})


def test_registry_merges_builtin_and_plugin_sensors(monkeypatch):
    monkeypatch.delenv("SARKIT_DISABLE_PLUGINS", raising=False)
    plugins.reset()
    names = set(sensors.registry())
    assert {"gaofen3", "hongtu1", "qilu1", "sentinel1", "umbra", "generic", "iceye"} <= names
    monkeypatch.setenv("SARKIT_DISABLE_PLUGINS", "1")
    plugins.reset()
    assert "iceye" not in sensors.registry()
    plugins.reset()
