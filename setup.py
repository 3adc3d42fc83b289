"""Build hooks only (metadata lives in pyproject.toml): ship ``sd_zoo-autoload.pth`` into site-packages.

The .pth file makes timm import sd_zoo on first use (see ``sd_zoo/_autoload.py``). It must sit at the root of
the wheel, next to the ``sd_zoo`` package, for both regular and editable (PEP 660) installs.
"""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = Path(__file__).resolve().parent / 'sd_zoo-autoload.pth'


class BuildPyWithPth(build_py):
    """Copy the .pth into the build folder's root, so bdist_wheel puts it at the wheel root."""

    def run(self) -> None:
        super().run()
        self.copy_file(str(PTH), str(Path(self.build_lib) / PTH.name))

    def get_outputs(self, include_bytecode: bool = True):
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PTH.name)]


class EditableWheelWithPth(editable_wheel):
    """Editable installs do not copy build_py's extra files: add the .pth to the editable wheel's root."""

    def _run_build_commands(self, dist_name, unpacked_wheel, *args, **kwargs):
        result = super()._run_build_commands(dist_name, unpacked_wheel, *args, **kwargs)
        shutil.copy2(PTH, Path(unpacked_wheel) / PTH.name)
        return result


setup(cmdclass={'build_py': BuildPyWithPth, 'editable_wheel': EditableWheelWithPth})
