"""Helpers shared by the tests."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from runs import S, eval_dataset, video_folder
from tiny import save_tiny_vae, tiny_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]

# Prepended to the child's code: a checkpoint folder must load through transformers' remote-code path alone, so the
# child must not find this repository's own modules, whether through the working directory, PYTHONPATH or an
# editable install. Remote code is imported as `transformers_modules.<...>.processing_foveated`, a dotted name that
# this finder lets through.
_BLOCK_PROJECT_MODULES = '''
import importlib.abc
import sys

class _BlockProjectModules(importlib.abc.MetaPathFinder):
    names = {"foveated_vlm", "train_hf"}

    def find_spec(self, fullname, path=None, target=None):
        top = fullname.split(".")[0]
        if top in self.names or ("." not in fullname and fullname.endswith("_foveated")):
            raise ModuleNotFoundError(f"No module named {fullname!r} (blocked by run_isolated_python)", name=fullname)
        return None

sys.meta_path.insert(0, _BlockProjectModules())
del importlib, sys, _BlockProjectModules
'''


def run_isolated_python(code: str, cwd: str | os.PathLike) -> subprocess.CompletedProcess:
    """Run `code` in a fresh Python in `cwd` that cannot import this repository's modules (`*_foveated`,
    `foveated_vlm`, ...), offline, with its own transformers remote-code cache under `cwd`.
    Fails the calling test, showing stdout and stderr, when the child exits non-zero."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(Path(cwd) / "hf_modules"))
    python_path = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != REPO_ROOT]
    env["PYTHONPATH"] = os.pathsep.join(python_path)
    result = subprocess.run(
        [sys.executable, "-c", _BLOCK_PROJECT_MODULES + textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        pytest.fail(
            f"isolated python exited with {result.returncode}\n"
            f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}",
            pytrace=False,
        )
    return result


@pytest.fixture(name="run_isolated_python")
def _run_isolated_python_fixture():
    """The helper as a fixture: `def test_x(tmp_path, run_isolated_python): run_isolated_python(code, tmp_path)`."""
    return run_isolated_python


# ---- Shared by the report and analyses tests (tests/runs.py builds the folders) ----


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and a busy machine makes OpenMP spin-waiting slow them down a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The held-out split and a VAE, shared by the run folders."""
    root = tmp_path_factory.mktemp("data")
    eval_dataset(root / "eval")
    save_tiny_vae(root / "vae", S)
    description = "Synthetic clips of the positive control (docs/RESULTS.md) (cued: look-alike objects)"
    return {"eval_dataset": str(root / "eval"), "vae": str(root / "vae"), "description": description}


# ---- Shared by the data, precompute and train tests ----


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory) -> Path:
    """Real mp4 files (runs.video_folder): NUM_GOOD synthetic videos with sidecars in train/, the BROKEN ones in
    broken/."""
    return video_folder(tmp_path_factory.mktemp("videos"))


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory) -> str:
    return save_tiny_vae(tmp_path_factory.mktemp("tiny_vae"), S)


# ---- Shared by the processing and train tests ----


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()
