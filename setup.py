"""Packaging for mmlinattn.

The core (attention operators and backbones) needs only torch, timm and
mmengine; the OpenMMLab detection/segmentation stack is the ``mm`` extra
because mmcv 2.1.0 must be compiled (see ``tools/setup.sh``).
"""
import os.path as osp

from setuptools import find_packages, setup


def read_version() -> str:
    namespace: dict = {}
    with open(osp.join(osp.dirname(__file__), 'mmlinattn', 'version.py')) as f:
        exec(f.read(), namespace)
    return namespace['__version__']


def read_readme() -> str:
    with open(osp.join(osp.dirname(__file__), 'README.md'), encoding='utf-8') as f:
        return f.read()


setup(
    name='mmlinattn',
    version=read_version(),
    description='InLine (injective linear) attention backbones for '
    'MMDetection and MMSegmentation',
    long_description=read_readme(),
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    packages=find_packages(include=['mmlinattn', 'mmlinattn.*']),
    python_requires='>=3.9',
    install_requires=[
        'torch>=2.1',
        'timm>=1.0,<2',
        'mmengine>=0.10.0,<1.0',
        'numpy>=1.24',
    ],
    extras_require={
        # mmdet 3.3.0 and mmseg 1.2.2 both assert mmcv < 2.2.0.
        'mm': [
            'mmcv>=2.0.0rc4,<2.2.0',
            'mmdet>=3.3.0,<3.4.0',
            'mmsegmentation>=1.2.2,<1.3.0',
            'ftfy',
            'regex',
            'pycocotools',
        ],
        'dev': ['pytest>=7', 'pytest-timeout>=2', 'ruff>=0.6'],
        'benchmark': ['matplotlib', 'rich', 'psutil'],
        # ONNX export (torch.onnx's dynamo exporter needs onnxscript) and ONNX Runtime.
        'deploy': ['onnx>=1.17', 'onnxruntime>=1.20', 'onnxscript>=0.5'],
        # Gigapixel files: tiled/OME/Geo TIFF in and out (tifffile), whole slides (OpenSlide's
        # library ships in the openslide-bin wheel).
        'large-images': ['tifffile>=2024.1', 'openslide-python>=1.4', 'openslide-bin>=4.0',
                         'shapely>=2.0', 'pyogrio>=0.7'],
    },
    zip_safe=False,
)
