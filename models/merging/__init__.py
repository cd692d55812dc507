"""Model merging with mergekit's methods and semantics, in mergekit's phases:

    config.py    MergeConfig (the pipeline's merge stage) and validate_config (a mergekit YAML -> MergeSpec)
    plan.py      every output tensor, its sources and parameters, from the safetensors headers alone
    run.py       run_merge: stream tensors through a method into shards
    recipe.py    mergekit YAML / mergekit-multi files as chained run_merge calls
    registry.py  every merge method by name (methods/: one module per family)

Nothing is imported here, so `models.merging.config` loads without torch.
"""
