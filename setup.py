"""Build script: the C++ CPU kernels as the extension ``fastland._C``.

Environment switches:
  FASTLAND_SKIP_EXT=1   build no extension (pure-Python install; reference/Triton backends only)
  FASTLAND_DEBUG=1      compile with -O0 -g
"""
import glob
import os

from setuptools import setup

ext_modules = []
cmdclass = {}
if os.environ.get("FASTLAND_SKIP_EXT", "0") != "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    debug = os.environ.get("FASTLAND_DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    ext_modules.append(
        CppExtension(
            name="fastland._C",
            sources=sources,
            include_dirs=[os.path.join(here, "csrc")],
            extra_compile_args={"cxx": opt + ["-fopenmp"]},
            extra_link_args=["-fopenmp"],
        )
    )
    cmdclass["build_ext"] = BuildExtension.with_options(no_python_abi_suffix=False)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
