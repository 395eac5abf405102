"""mta-jax: Mixture-of-Task-Adapters for T5 in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="mta_jax",
    version="0.1.0",
    description="Mixture-of-Task-Adapters (MTA) for small T5 multi-task learners, in JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["mta_jax", "mta_jax.*", "benchmarks", "benchmarks.*"]),
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        # Every path may be local or gs://: epath for files, gcsfs behind it for gs://,
        # google-cloud-storage for tensorboardX's gs:// event files.
        "etils[epath,epy]",
        "gcsfs",
        "google-cloud-storage",
        "ml_collections>=1.0",
        "absl-py",
        "transformers>=4.45",
        "sentencepiece",
        "safetensors",
        "tensorflow-datasets>=4.9.8",
        "grain>=0.2.10",
        "numpy",
        # TensorBoard event files without TensorFlow (flax.metrics.tensorboard imports TF).
        "tensorboardX",
        "matplotlib",
        "tqdm",
    ],
    extras_require={
        # torch==2.13.0 is the CPU build on these machines; a bare `torch` pulls CUDA.
        # jax[tpu] brings libtpu, which compiles for TPU slices on any Linux host (the
        # mta_jax.compile tests); it follows the installed jax (0.10 on 3.11, 0.12 on 3.12).
        # pytest-xdist: two workers, one test file each (--dist loadfile), as on 2 cores the
        # tests that train in subprocesses leave one core idle much of the time.
        "test": ["pytest>=8", "pytest-xdist", "torch==2.13.0", "nbclient", "nbformat", "ipykernel",
                 "gcp-storage-emulator",
                 "jax[tpu]; sys_platform == 'linux' and platform_machine == 'x86_64'"],
        # Serving an exported model with PyTorch (mta_jax.torch); any torch build fits.
        "torch": ["torch>=2.1", "transformers>=5", "safetensors", "etils[epath]"],
    },
)
