"""fpn_tf: Feature Pyramid Networks with Faster R-CNN for TensorFlow / Keras 3."""

from setuptools import find_packages, setup

setup(
    name="fpn_tf",
    version="0.1.0",
    description="Feature Pyramid Networks (Lin et al., CVPR 2017) with Faster R-CNN in TensorFlow / Keras 3",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fpn_tf", "fpn_tf.*"]),
    package_data={"fpn_tf": ["configs/*.yaml"]},
    python_requires=">=3.10",
    install_requires=[
        # tensorflow-cpu and tensorflow write the same folder: never install both.
        # The CPU build is the default; GPU users install `fpn_tf[gpu]` in a fresh env.
        "tensorflow-cpu==2.21.0; platform_machine=='x86_64'",
        "tensorflow==2.21.0; platform_machine!='x86_64'",
        "keras>=3.15,<4",
        "tensorflow-datasets==4.9.10",
        # tensorflow-datasets 4.9.10 imports it without declaring it (Python 3.11).
        "importlib_resources",
        "pycocotools>=2.0.8",
        "absl-py",
        "numpy",
        "pyyaml",
        "pillow",
    ],
    extras_require={
        "test": ["pytest", "ruff"],
        "torch": ["torch==2.14.1", "torchvision==0.29.1"],
        # tensorflow-serving-api depends on `tensorflow`; install it with --no-deps
        # (see README) so it does not pull the full TF beside tensorflow-cpu.
    },
)
