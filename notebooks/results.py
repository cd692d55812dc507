# %% [markdown]
# # Branch-Merge results across runs
# Reads every pipeline run from MLflow (parent runs of the `branchmerge` experiment), tabulates mean greedy
# pass@1 per model, and plots how each merge method's merged and RL models compare with the base.
# Jupytext percent format: open it as a notebook in Jupyter/VS Code, or run it as a script:
#     python notebooks/results.py [--out results_by_run.png]

# %%
import argparse
import os

import pandas as pd
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient

parser = argparse.ArgumentParser()
parser.add_argument("--experiment", default="branchmerge")
parser.add_argument("--out", default="results_by_run.png")
args, _ = parser.parse_known_args()

# %%
client = MlflowClient(os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
experiment = client.get_experiment_by_name(args.experiment)
runs = client.search_runs([experiment.experiment_id], filter_string="attributes.status = 'FINISHED'")
parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
rows = [{"run": r.info.run_name, "merge.method": r.data.params.get("merge.method"),
         **{k.removeprefix("pass_at_1."): v for k, v in r.data.metrics.items() if k.startswith("pass_at_1.")}}
        for r in parents]
table = pd.DataFrame(rows)
print(table.to_string(index=False, float_format="{:.3f}".format))

# %%
by_method = table.groupby("merge.method")[[c for c in ("base", "merged", "rl") if c in table]].mean()
fig = Figure(figsize=(6, 3.5))
ax = fig.add_subplot()
by_method.plot.bar(ax=ax, rot=0)
ax.set_ylabel("mean greedy pass@1")
ax.set_title("merged and RL models by merge method")
fig.tight_layout()
fig.savefig(args.out)
print(f"wrote {args.out}")
