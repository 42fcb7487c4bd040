"""The installed package, as `pip install foveated-vlm` would lay it out: a wheel built from this repository,
installed into a folder of its own, run from another working directory through its console scripts."""

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from foveated_vlm.tiny_vae import make_tiny_vae
from tiny import TINY_TEXT, TINY_VISION, save_tiny_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("foveated-train", "foveated-evaluate", "foveated-precompute", "foveated-report", "foveated-caption",
           "foveated-synthetic")  # fmt: skip


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel's files installed (without dependencies, which this environment has) into site/."""
    root = tmp_path_factory.mktemp("installed")
    # Built from a copy: pip builds in the source tree, whose build/ and egg-info must not appear in the checkout.
    ignored = shutil.ignore_patterns(".git", ".venv", "data", "outputs", "logs", "build", "*.egg-info", "__pycache__")
    shutil.copytree(REPO_ROOT, root / "source", ignore=ignored)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    build = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "wheel"),
                            str(root / "source")], capture_output=True, text=True)  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (root / "wheel").glob("foveated_vlm-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(root / "site"), str(wheel)], check=True)
    return root / "site"


@pytest.mark.slow
def test_the_wheel_holds_the_remote_code_one_namespace_and_the_card_template(installed):
    top_level = {path.name for path in installed.iterdir() if not path.name.endswith(".dist-info")}
    top_level -= {"bin", "__pycache__"}  # the scripts, and pip's compiled top-level modules
    assert top_level == {"foveated_vlm", "configuration_foveated.py", "modeling_foveated.py", "processing_foveated.py"}
    assert (installed / "foveated_vlm" / "model_card.md").read_text() == (REPO_ROOT / "model_card.md").read_text()
    assert set(SCRIPTS) <= {path.name for path in (installed / "bin").iterdir()}
    (dist_info,) = installed.glob("foveated_vlm-*.dist-info")
    assert "Apache License" in next(dist_info.rglob("LICENSE")).read_text()


@pytest.mark.slow
def test_the_installed_commands_train_and_evaluate_from_another_folder(installed, tmp_path):
    """foveated-train then foveated-evaluate, with only the installed folder on the path (no checkout, no
    configs/): the model card comes from the packaged template."""
    vae = make_tiny_vae(tmp_path / "vae", image_size=64, num_train_frames=8, steps=2)
    config = {
        "vision_model": "", "text_model": "", "tokenizer": save_tiny_tokenizer(tmp_path / "tokenizer"),
        "vision_config": dict(TINY_VISION), "text_config": dict(TINY_TEXT),
        "model_config": {"query_dim": 16, "head_channels": 16, "head_mlp_dim": 32},
        "data_source": "synthetic", "num_train_videos": 4, "num_eval_videos": 2, "synthetic_size": 64,
        "num_video_frames": 4, "num_frames": 4, "image_size": 64, "vae": vae, "cache_dir": str(tmp_path / "cache"),
        "per_device_train_batch_size": 2, "per_device_eval_batch_size": 2, "max_steps": 2, "report_to": "none",
        "num_attention_figures": 0, "dataloader_pin_memory": False,
    }  # fmt: skip
    (tmp_path / "work").mkdir()
    config_path = tmp_path / "work" / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(installed), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def run(*command):
        result = subprocess.run(command, cwd=tmp_path / "work", env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
        return result.stdout

    where = run(sys.executable, "-c", "import foveated_vlm.card as card; print(card.__file__, card.MODEL_CARD_TEMPLATE)")
    assert where.split() == [str(installed / "foveated_vlm" / "card.py"), str(installed / "foveated_vlm" / "model_card.md")]
    run(str(installed / "bin" / "foveated-train"), "tiny.yaml", "--output_dir", "run")
    assert "| loss_fine" in (tmp_path / "work" / "run" / "README.md").read_text()
    stdout = run(str(installed / "bin" / "foveated-evaluate"), "run", "tiny.yaml", "--output_dir", "evaluated")
    assert "loss_fine" in stdout and (tmp_path / "work" / "evaluated" / "eval_results.json").is_file()


def _package_imports() -> dict[str, set[str]]:
    """Each package module (the three model modules and foveated_vlm.*) -> the package modules it imports at run
    time, wherever in the file (imports under `if TYPE_CHECKING:` are types only, and left out)."""
    files = {path.stem: path for path in REPO_ROOT.glob("*_foveated.py")}
    files.update({f"foveated_vlm.{path.stem}": path for path in (REPO_ROOT / "foveated_vlm").glob("*.py")})
    files.pop("foveated_vlm.__init__")
    graph = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text())
        type_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                     and getattr(block.test, "id", None) == "TYPE_CHECKING" for node in ast.walk(block)}  # fmt: skip
        imported = set()
        for node in ast.walk(tree):
            if id(node) in type_only:
                continue
            if isinstance(node, ast.ImportFrom) and node.module:
                imported |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
        graph[name] = (imported & set(files)) - {name}
    return graph


def test_the_import_graph_has_no_cycle_and_at_most_six_floors():
    """Floors: a module importing no package module is on floor 1, any other one floor above its highest import.
    A short stack keeps the metrics, the card and the data pipeline importable without the report and training."""
    graph = _package_imports()
    floors = {}

    def floor(name, path=()):
        if name in path:
            raise AssertionError(f"import cycle: {' -> '.join(path + (name,))}")
        if name not in floors:
            floors[name] = 1 + max((floor(child, path + (name,)) for child in graph[name]), default=0)
        return floors[name]

    assert max(floor(name) for name in graph) <= 6, sorted(floors.items(), key=lambda item: item[1])
    # The lower floors load neither the model nor matplotlib.
    assert graph["foveated_vlm.metrics"] == set() and "foveated_vlm.figures" not in graph["foveated_vlm.card"]
