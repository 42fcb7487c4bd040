"""The build script beside pyproject.toml (which holds the metadata): it ships the top-level model_card.md, the
template every saved model's README.md is rendered from, inside the foveated_vlm package, so that an installed
package writes cards without the source tree."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

MODEL_CARD = "model_card.md"


class BuildPyWithModelCard(build_py):
    def run(self):
        super().run()
        target = Path(self.build_lib, "foveated_vlm", MODEL_CARD)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(__file__).resolve().parent / MODEL_CARD, target)


setup(cmdclass={"build_py": BuildPyWithModelCard})
