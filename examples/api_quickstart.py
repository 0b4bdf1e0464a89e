"""The README's Python API example, as a script: `python examples/api_quickstart.py`
(tests/test_api.py checks the README shows exactly this code, and runs it)."""

import raysweep

run = raysweep.train(overrides={"train.epochs": 3}, workers=1, storage="runs", name="api-run")
print(run["status"], run["test_accuracy"], run["checkpoint"])
epochs = raysweep.results("runs/api-run")          # a pyarrow Table, best epoch first
print(epochs.to_pandas()[["epoch", "val_accuracy", "val_loss"]])
best = raysweep.tune("digits_cnn", trials=2, max_epochs=2, scheduler="none", storage="runs", name="api-search")
report = raysweep.predict("runs/api-run", data="digits", out="preds.parquet")
model = raysweep.export(best["checkpoint"], "model.pt")   # a TorchScript file
