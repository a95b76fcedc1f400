"Install the `icrt` package (exported from `nbs/` by nbdev)."
from configparser import ConfigParser
from pathlib import Path

import setuptools

cfg = ConfigParser()
cfg.read(Path(__file__).parent / "settings.ini")
meta = cfg["DEFAULT"]

requirements = [
    "torch>=2.4",
    "torchvision>=0.19",
    "numpy>=1.24",
    "scipy>=1.10",
    "timm>=1.0",
    "peft>=0.11",
    "diffusers>=0.27",
    "safetensors>=0.4",
    "h5py>=3.8",
    "tyro>=0.8",
    "pyyaml>=6",
    "tqdm>=4.60",
    "matplotlib>=3.7",
    "ipywidgets>=8",
    "tensorboard>=2.12",
    "pillow>=9",
    "fastcore>=1.12.3,<2",
    "websockets>=13",
    "msgpack>=1.0",
    "simplejpeg>=1.7",  # libjpeg-turbo codec of the jpeg image layout
]
extras = {
    "sim": ["metaworld>=3.1,<3.2", "mujoco>=3.3", "pillow>=9"],
    "convert": ["pyarrow>=14", "av>=12"],  # icrt_convert --from lerobot/droid: Parquet columns, MP4 frames
    "docs": ["mkdocs>=1.6,<2", "mkdocs-material>=9.5", "mkdocs-jupyter>=0.25"],  # tools/docs.py site
    "dev": ["nbdev==2.4.14", "execnb<0.2", "fastcore>=1.12.3,<2", "pytest>=7", "ipykernel>=6", "transformers>=4.40",
            "dm-tree>=0.1.8"],  # openpi-client's ActionChunkBroker (tests/test_openpi.py); the client itself: see .ci/run
}

console_scripts = [
    "icrt_check=icrt.data.format:check_cli",
    "icrt_convert=icrt.data.convert:convert_cli",
    "icrt_compress=icrt.data.compress:compress_cli",
    "icrt_synth=icrt.data.synthetic:synth_cli",
    "icrt_metaworld_gen=icrt.sim.metaworld:gen_cli",
    "icrt_bench_metaworld=icrt.bench.metaworld:bench_metaworld_cli",
    "icrt_train=icrt.train:main",
    "icrt_eval=icrt.eval:eval_cli",
    "icrt_bench_loader=icrt.bench.loader:bench_loader_cli",
    "icrt_bench_inference=icrt.bench.inference:bench_inference_cli",
    "icrt_bench_train=icrt.bench.train:bench_train_cli",
    "icrt_demo=icrt.demo:demo_cli",
    "icrt_import_published=icrt.published:import_published_cli",
    "icrt_serve=icrt.serve:serve_cli",
    "icrt_bench_serve=icrt.bench.serve:bench_serve_cli",
    "icrt_bench_convert=icrt.bench.convert:bench_convert_cli",
]

setuptools.setup(
    name=meta["lib_name"],
    version=meta["version"],
    description=meta["description"],
    long_description=(Path(__file__).parent / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    author=meta["author"],
    python_requires=">=" + meta["min_python"],
    packages=setuptools.find_packages(include=["icrt", "icrt.*"]),
    include_package_data=True,
    install_requires=requirements,
    extras_require=extras,
    entry_points={"console_scripts": console_scripts, "nbdev": ["icrt=icrt._modidx:d"]},
    zip_safe=False,
)
