"""fpn_tf: Feature Pyramid Networks with Faster R-CNN for TensorFlow / Keras 3.

TensorFlow comes from an extra, because its CPU and GPU builds are different
distributions that write the same ``tensorflow/`` folder and must never be
installed together:

    pip install '.[cpu]'        # tensorflow-cpu 2.21 on x86_64 (tensorflow elsewhere): small, no CUDA
    pip install '.[and-cuda]'   # tensorflow[and-cuda] 2.21: TF + the CUDA / cuDNN / NCCL wheels
    pip install .               # no TensorFlow: use the one already installed (e.g. a TF container)

The configs/ folder is installed as the package ``fpn_tf.configs``.
"""

from setuptools import find_packages, setup

TF_VERSION = "2.21.*"
TF_CPU = [
    f"tensorflow-cpu=={TF_VERSION}; platform_machine=='x86_64' or platform_machine=='AMD64'",
    f"tensorflow=={TF_VERSION}; platform_machine!='x86_64' and platform_machine!='AMD64'",
]
TF_CUDA = [f"tensorflow[and-cuda]=={TF_VERSION}"]
# Exports that run outside TensorFlow (fpn_tf/export/portable.py), pinned to versions
# measured with TF 2.21: tf2onnx converts, onnx checks, onnxruntime runs the file.
ONNX = ["tf2onnx==1.17.0", "onnx==1.23.2", "onnxruntime==1.32.0"]
OPENVINO = ONNX + ["openvino==2026.4.0"]

setup(
    name="fpn_tf",
    version="0.1.0",
    description="Feature Pyramid Networks (Lin et al., CVPR 2017) with Faster R-CNN in TensorFlow / Keras 3",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fpn_tf", "fpn_tf.*"]) + ["fpn_tf.configs"],
    package_dir={"fpn_tf.configs": "configs"},
    package_data={"fpn_tf.configs": ["*.yaml"]},
    python_requires=">=3.10",
    install_requires=[
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
        "cpu": TF_CPU,
        "and-cuda": TF_CUDA,
        "gpu": TF_CUDA,  # the same as and-cuda (TensorFlow's own extra name)
        "test": ["pytest", "ruff"],
        "onnx": ONNX,
        "openvino": OPENVINO,
        "torch": ["torch==2.14.1", "torchvision==0.29.1"],
        # tensorflow-serving-api depends on `tensorflow`: beside tensorflow-cpu install it
        # with --no-deps (see README); beside tensorflow[and-cuda] plainly.
    },
)
