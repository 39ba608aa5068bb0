"""Build hook for the optional C kernels; all other metadata is in pyproject.toml.

``hubmerge_plugins._ckernels`` (TIES' hot loops) is compiled when a C compiler is present. The
extension is optional: without a compiler the build goes on and hubmerge uses its torch path.
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildKernels(build_ext):
    """Compile without fast-math or contraction (results equal the torch path's); -fno-trapping-math
    only lets the compiler vectorize the selects."""

    def build_extensions(self):
        flags = ["/O2", "/fp:precise"] if self.compiler.compiler_type == "msvc" else \
            ["-O3", "-ffp-contract=off", "-fno-fast-math", "-fno-trapping-math"]
        for extension in self.extensions:
            extension.extra_compile_args = flags
        super().build_extensions()


setup(
    ext_modules=[Extension("hubmerge_plugins._ckernels", ["plugins/_ckernels.c"], optional=True)],
    cmdclass={"build_ext": BuildKernels},
)
