"""Build pyengine: the Python package, kernels/ as pyengine.kernels, and the C++ extension pyengine._C.

torch must be installed first and the build run without isolation (an isolated build resolves
`torch` on its own and pulls a multi-GB CUDA wheel):

    pip install torch==2.13.0 && pip install --no-build-isolation -e .
"""
import glob
import os

from setuptools import setup

try:
    import torch  # noqa: F401
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError as exc:  # fail loudly: there is no pure-Python release install
    raise SystemExit("pyengine's build needs torch installed first: pip install torch==2.13.0, then "
                     "pip install --no-build-isolation -e .") from exc

ROOT = os.path.dirname(os.path.abspath(__file__))


def extension():
    """The C++ CPU kernels. Nothing is compiled for a GPU at install (no CUDA toolkit needed): the GPU runs the
    Triton kernels of pyengine.kernels, which Triton compiles on first use."""
    cpp = sorted(glob.glob("csrc/*.cpp"))
    # -fopenmp: at::parallel_for is inlined into our sources and is serial without it.
    # -ffp-contract=off: a scalar a*b+c is never fused into an FMA behind our back, so a loop the compiler
    # vectorizes with an alignment peel rounds every element alike (else results depended on addresses).
    # -std=c++20: what torch's headers are written for (its own default). -g1: line tables for profilers, not
    # the full debug info of torch's headers that Python's -g asks for (half of a file's compile time).
    args = {"cxx": ["-O3", "-std=c++20", "-g1", "-fopenmp", "-ffp-contract=off"]}
    link = ["-fopenmp"]
    return CppExtension("pyengine._C", cpp, extra_compile_args=args, extra_link_args=link)


setup(
    name="pyengine",
    version="0.1.0",
    description="Fast inference for encoder-decoder Transformer translation models",
    python_requires=">=3.10",
    packages=["pyengine", "pyengine.decoding", "pyengine.distributed", "pyengine.documents", "pyengine.loaders",
              "pyengine.model", "pyengine.serving", "pyengine.kernels"],
    package_dir={"pyengine.kernels": "kernels"},
    package_data={"pyengine": ["models/default/*", "serving/static/*"]},
    include_package_data=True,
    install_requires=["torch>=2.4", "sentencepiece>=0.2", "safetensors>=0.4", "tqdm>=4.60", "tokenizers>=0.20",
                      "fastapi>=0.115", "uvicorn>=0.30", "uvloop>=0.19; sys_platform != 'win32'", "httptools>=0.6",
                      "prometheus-client>=0.20", "PyYAML>=6",
                      # documents: sentence splitting, language detection and names, .docx, uploads, request limits
                      "sentencex>=1.0.32", "py3langid>=0.4", "langcodes>=3.5", "language-data>=1.3",
                      "python-docx>=1.2", "python-multipart>=0.0.20", "limits>=5.8"],
    extras_require={
        "test": ["pytest>=8", "transformers>=5.0", "sacrebleu>=2.4"],
        # pyengine.distributed: corpus translation on Ray Data, replicated serving on Ray Serve
        "ray": ["ray[data,serve]>=2.40", "httpx>=0.27"],
        # text of OpenNMT-py checkpoints trained with the onmt_tokenize transform (the OpenNMT Tokenizer)
        "opennmt": ["pyonmttok>=1.37"],
    },
    entry_points={"console_scripts": ["pyengine=pyengine.cli:main"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
