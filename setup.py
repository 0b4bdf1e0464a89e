from setuptools import find_packages, setup

setup(
    name="raysweep",
    version="0.1.0",
    description="Distributed training and hyperparameter search for image classifiers on Ray",
    python_requires=">=3.10",
    packages=find_packages(include=["raysweep*", "cluster*", "trainers*", "search_spaces*"]),
    package_data={"search_spaces": ["*.yaml"], "cluster": ["*.yaml"]},
    install_requires=[
        "ray[data,train,tune,serve,default]>=2.58,<2.61",  # supported: 2.58-2.60 (docs/internals.md)
        "torch>=2.4",
        "torchvision>=0.19",
        "optuna>=4.0",
        "pyarrow>=14",
        "numpy>=1.24",
        "pyyaml>=6",
        "matplotlib>=3.7",
        # report.html, which every search writes: Optuna's visualisation module draws with plotly
        "plotly>=5.20",
        "scikit-learn>=1.3",
        "pandas>=2.0",
    ],
    extras_require={"dev": ["pytest>=8", "pytest-timeout>=2.3", "duckdb", "polars",
                            "pytest-xdist>=3.5",  # `make test` runs test modules in 2 processes
                            # 5.2.2: pyarrow's S3 writes fail on 5.2.1 (getmoto/moto#10055)
                            "moto[server]>=5.2.2", "boto3",
                            "optuna-dashboard",  # tests docs/tune.md's claim that it opens a search's journal
                            # the tracking extras, and TensorBoard's event reader for their tests
                            "mlflow-skinny>=3.0", "tensorboardX>=2.6", "tensorboard>=2.14"],
                    # MLflow's client (a server or a local sqlite store); `pip install mlflow` adds its UI
                    "mlflow": ["mlflow-skinny>=3.0"],
                    # the event writer (numpy + protobuf); `pip install tensorboard` to view the logs
                    "tensorboard": ["tensorboardX>=2.6"]},
    entry_points={"console_scripts": ["raysweep=cluster.cli:main"]},
)
