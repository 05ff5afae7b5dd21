"""Everything is declared in pyproject.toml; this file only adds one file to the wheels.

`seekformer_lm_eval.pth` goes to the root of site-packages in regular and editable installs, so that
`lm_eval --model seekformer` works (lm-eval has no plugin entry point for models; see
src/_seekformer_lm_eval.py). Without it, everything else still works.
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "seekformer_lm_eval.pth"
PTH_SOURCE = os.path.join("src", PTH)


class BuildPyWithPth(build_py):
    """Regular wheels: copy the .pth beside the packages in build_lib (the wheel's purelib root)."""

    def run(self):
        super().run()
        if not getattr(self, "editable_mode", False):
            self.copy_file(PTH_SOURCE, os.path.join(self.build_lib, PTH), preserve_mode=0)

    def get_outputs(self, include_bytecode=True):
        outputs = list(super().get_outputs(include_bytecode))
        if not getattr(self, "editable_mode", False):
            outputs.append(os.path.join(self.build_lib, PTH))
        return outputs


cmdclass = {"build_py": BuildPyWithPth}

try:  # setuptools >= 64 (PEP 660 editable installs)
    from setuptools.command.editable_wheel import editable_wheel
except ImportError:  # pragma: no cover
    editable_wheel = None

if editable_wheel is not None and hasattr(editable_wheel, "_create_wheel_file"):

    class EditableWheelWithPth(editable_wheel):
        """`pip install -e .`: add the .pth to the editable wheel (it imports from src/ through the
        editable path entry, which sorts first: `__editable__...pth` < `seekformer_lm_eval.pth`)."""

        def _create_wheel_file(self, bdist_wheel):
            from wheel.wheelfile import WheelFile

            wheel_path = super()._create_wheel_file(bdist_wheel)
            with WheelFile(wheel_path, "a") as wheel:
                wheel.write(PTH_SOURCE, PTH)
            return wheel_path

    cmdclass["editable_wheel"] = EditableWheelWithPth

setup(cmdclass=cmdclass)
