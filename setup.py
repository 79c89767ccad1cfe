"""Packaging for helios-jax: the JAX/Flax port of the Helios video diffusion transformer."""
from setuptools import find_packages, setup

setup(
    name="helios-jax",
    version="0.1.0",
    description="JAX/Flax reimplementation of Helios, an autoregressive video diffusion transformer",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.12",
    packages=find_packages(include=["helios_jax", "helios_jax.*", "checkpoints_convert", "checkpoints_convert.*"]),
    install_requires=[
        "jax>=0.11.2",
        "flax>=0.12",
        "optax",
        "orbax-checkpoint",
        "chex",
        "tensorstore",
        "ml_collections",
        "grain",
        "safetensors",
        "numpy",
        "ml_dtypes",  # bfloat16 as a numpy dtype when reading and writing checkpoints
        "imageio",
        "imageio-ffmpeg",
        "pillow",  # I2V/V2V preprocessing resizes with PIL, as the reference does
        "tqdm",
        "tokenizers",  # the UMT5 tokenizer (tokenizer.json); transformers is not needed at run time
        "ftfy",  # prompt cleaning, as the reference does it
        "qwix>=0.1.8",  # weight-only int8 (helios_jax/quantization.py)
    ],
    extras_require={
        # References for parity tests only; the product never imports torch.
        # jax[tpu] brings the libtpu that matches jax (0.0.50.1 for jax 0.12.0.1; 214 MB download,
        # 640 MB installed): tests/test_aot.py compiles for TPU topologies with it, no TPU needed.
        "test": ["pytest", "pytest-xdist", "torch", "diffusers==0.42.1", "transformers", "accelerate",
                 "sentencepiece",  # sentencepiece builds the test tokenizer
                 "peft",  # LoRA parity reference (tests/test_lora_peft_parity.py)
                 "jax[tpu]",
                 "tensorflow-datasets", "array_record", "importlib_resources",  # the data tests write shards
                 "gradio", "selenium"],  # the web demo, driven by Debian's chromium (tests/test_serve.py)
        # prepare-data writes and the training loader reads ArrayRecord shards through TFDS; no
        # TensorFlow needed. importlib_resources: TFDS 4.9.10 imports it when it builds a dataset but
        # declares it for Python < 3.9 only.
        "data": ["tensorflow-datasets", "array_record", "importlib_resources"],
        "demo": ["gradio"],  # helios-jax serve
    },
    entry_points={"console_scripts": ["helios-jax=helios_jax.cli:main"]},
)
