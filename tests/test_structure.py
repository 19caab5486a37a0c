"""The house rules that keep the code readable, and the configs every entry point composes.
None of these needs real data."""
import ast
import hashlib

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests import realdata
from tests.getchu_site import GetchuSite, serve
from tests.helpers import ROOT

STAGES = {"scrape", "crop", "pack", "train", "sample", "evaluate", "data", "explore", "export"}
PACKAGE = ROOT / "pipeline"


def imported_modules(path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            if node.module == "pipeline":  # from pipeline import crop
                found |= {f"pipeline.{alias.name}" for alias in node.names}
    return found


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*.py")), ids=lambda p: p.name)
def test_stages_meet_only_through_files_and_shared_helpers(path):
    """No stage imports another stage (data.py composes the three data stages); shared helpers import no stage."""
    allowed = {"pipeline.scrape", "pipeline.crop", "pipeline.pack"} if path.stem == "data" else set()
    stage_imports = {m for m in imported_modules(path) if m.startswith("pipeline.")
                     and m.split(".")[1] in STAGES} - allowed
    assert not stage_imports, f"{path.name} imports {sorted(stage_imports)}: move what they share to a helper module"


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*.py")), ids=lambda p: p.name)
def test_no_function_is_longer_than_sixty_lines(path):
    long = [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60]
    assert not long, f"{path.name}: split {long} into functions a reader can find by name"


def test_no_test_module_imports_another():
    for path in (ROOT / "tests").glob("test_*.py"):
        others = {m for m in imported_modules(path) if m.startswith("tests.test_")}
        assert not others, f"{path.name} imports {others}: share through conftest.py fixtures or tests/helpers.py"


PRIMARY = sorted(p.stem for p in (ROOT / "conf").glob("*.yaml"))


@pytest.mark.parametrize("name", PRIMARY)
def test_every_primary_config_composes_and_resolves(name):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name=name)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["paths"] == {"data_dir": "data", "output_dir": "outputs"}
    for group in ("scrape", "crop", "pack", "model", "train"):
        if group in resolved:
            assert resolved[group], f"{name}.yaml: group {group} is empty"


def test_sample_and_evaluate_take_obs_std_only_with_a_plus():
    """`python -m pipeline.sample +obs_std=0.1` is the contract: obs_std must not be a key there."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for name in ("sample", "evaluate"):
            assert "obs_std" not in compose(config_name=name)
            assert compose(config_name=name, overrides=["+obs_std=0.1"]).obs_std == 0.1
        assert compose(config_name="train", overrides=["obs_std=0.3"]).obs_std == 0.3


def test_real_data_registry_is_pinned_and_complete():
    entries = realdata.registry()
    assert len(entries) == 1 + 160 + 6 + realdata.FACES_SAMPLE
    for path, digest in entries.items():
        url = realdata.upstream_url(path)
        assert url.startswith("https://raw.githubusercontent.com/") and len(digest) == 64
        assert any(len(part) == 40 and all(c in "0123456789abcdef" for c in part) for part in url.split("/"))
    assert realdata.upstream_url("data/illustrations/CPP/Uiharu_Kazari_Modern_CPP_Design .jpg").endswith(
        "/CPP/Uiharu_Kazari_Modern_CPP_Design%20.jpg")


def test_missing_real_data_is_fetched_by_pinned_hash_from_a_local_server(tmp_path, monkeypatch):
    """The fallback path without ../shared: files come from their URLs, checked by sha256; a file whose
    bytes differ from the registry is refused."""
    body = b"<opencv_storage>cascade</opencv_storage>"
    served = {"/good.xml": body, "/changed.xml": body + b"!"}
    server = serve(lambda h: GetchuSite.send(h, 200, served[h.path], "application/xml")
                   if h.path in served else GetchuSite.send(h, 404, b"", "text/plain"))
    base = f"http://127.0.0.1:{server.server_address[1]}"
    digest = hashlib.sha256(body).hexdigest()
    monkeypatch.setattr(realdata, "registry", lambda: {"cascade/a.xml": digest, "cascade/b.xml": digest})
    try:
        realdata.fetch(["cascade/a.xml"], tmp_path, urls=lambda p: f"{base}/good.xml")
        assert (tmp_path / "cascade" / "a.xml").read_bytes() == body
        with pytest.raises(ValueError, match="SHA256"):
            realdata.fetch(["cascade/b.xml"], tmp_path, urls=lambda p: f"{base}/changed.xml")
        assert not (tmp_path / "cascade" / "b.xml").exists()
    finally:
        server.shutdown()
        server.server_close()


def test_the_cpu_preset_is_the_documented_default_and_the_gpu_preset_differs():
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        plain = compose(config_name="train", overrides=["preset=auto"])
        cpu = compose(config_name="train", overrides=["preset=cpu"])
        gpu = compose(config_name="train", overrides=["preset=gpu", "train.epochs=7"])
    for key in ("model", "train"):
        assert OmegaConf.to_container(plain[key]) == OmegaConf.to_container(cpu[key])
    assert cpu.preset_name == "cpu" and gpu.preset_name == "gpu"
    # the measured GPU preset: the same family, wider and longer (bench/RESULTS.md: the scaling rows)
    assert gpu.model.width > cpu.model.width and gpu.model.decoder_width > cpu.model.decoder_width
    assert OmegaConf.load(ROOT / "conf/preset/gpu.yaml").train.epochs > cpu.train.epochs
    assert gpu.train.epochs == 7  # a key given on the command line wins over the preset
