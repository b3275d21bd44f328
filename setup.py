"""Build script: the C++ CPU kernels as the extension ``fastland._C``.

Environment switches:
  FASTLAND_SKIP_EXT=1   build no extension (pure-Python install; reference/Triton backends only).
                        The install then carries the marker ``fastland/_C.skipped``, so that
                        fastland says the extension was skipped on purpose (not that it failed).
  FASTLAND_DEBUG=1      compile with -O0 -g (the released build: -O3, no debug info, stripped)
"""
import glob
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
SKIP_MARKER = os.path.join(HERE, "fastland", "_C.skipped")


def _extension():
    from torch.utils.cpp_extension import CppExtension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    debug = os.environ.get("FASTLAND_DEBUG", "0") == "1"
    compile_args = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    link_args = [] if debug else ["-s"]  # strip: the released .so carries no symbols beyond the dynamic ones
    return CppExtension(
        name="fastland._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": compile_args + ["-fopenmp"]},
        extra_link_args=link_args + ["-fopenmp"],
    )


ext_modules = []
cmdclass = {}
if os.environ.get("FASTLAND_SKIP_EXT", "0") == "1":
    with open(SKIP_MARKER, "w") as f:
        f.write("fastland was installed with FASTLAND_SKIP_EXT=1: no C++ extension was built.\n")
else:
    if os.path.exists(SKIP_MARKER):
        os.remove(SKIP_MARKER)
    from torch.utils.cpp_extension import BuildExtension

    ext_modules.append(_extension())
    cmdclass["build_ext"] = BuildExtension.with_options(no_python_abi_suffix=False)

setup(ext_modules=ext_modules, cmdclass=cmdclass, package_data={"fastland": ["_C.skipped"]})
