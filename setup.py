from setuptools import find_packages, setup

setup(
    name="raysweep",
    version="0.1.0",
    description="Distributed training and hyperparameter search for image classifiers on Ray",
    python_requires=">=3.10",
    packages=find_packages(include=["raysweep*", "cluster*", "trainers*", "search_spaces*"]),
    package_data={"search_spaces": ["*.yaml"], "cluster": ["*.yaml"]},
    install_requires=[
        "ray[data,train,tune,default]>=2.58,<2.61",  # supported: 2.58-2.60 (docs/internals.md)
        "torch>=2.4",
        "torchvision>=0.19",
        "optuna>=4.0",
        "pyarrow>=14",
        "numpy>=1.24",
        "pyyaml>=6",
        "matplotlib>=3.7",
        "scikit-learn>=1.3",
        "pandas>=2.0",
    ],
    extras_require={"dev": ["pytest>=8", "pytest-timeout>=2.3", "duckdb", "polars",
                            # 5.2.2: pyarrow's S3 writes fail on 5.2.1 (getmoto/moto#10055)
                            "moto[server]>=5.2.2", "boto3"]},
    entry_points={"console_scripts": ["raysweep=cluster.cli:main"]},
)
