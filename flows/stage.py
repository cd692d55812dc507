"""Single-stage CLI for DVC: `python -m flows.stage <stage> --out DIR` runs one stage from params.yaml.

dvc.yaml calls this for every stage, so `dvc repro` and `dvc exp run -S merge.method=ties` rebuild any artifact
without Prefect. Upstream artifacts are read from the upstream stages' DVC outputs (each carries its manifest
and digest), so the cache keys equal the flow's: a stage the flow already built is copied, not recomputed.

    python -m flows.stage params experiment=tiny     # compose conf/ -> params.yaml (what DVC's hydra mode does)
    python -m flows.stage mix --out dvc/mix
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import yaml

from flows.config import compose
from flows.schema import ConfigError, PipelineConfig, validate
from tasks import eval as eval_stage
from tasks import merge, mix, model, report, rl, sft, teacher
from tasks.common import Job, execute
from tasks.store import MANIFEST, ArtifactRef

os.environ.setdefault("HF_HUB_OFFLINE", "1")
STAGES = ("model", "mix", "teacher", "sft", "merge", "rl", "eval")


def ref_from_dir(path: str | Path) -> ArtifactRef:
    """An upstream DVC output as an ArtifactRef; refuses folders that are not sealed artifacts."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"{path}: not a branchmerge artifact (no readable {MANIFEST}): run its stage first") from err
    return ArtifactRef(stage=manifest["stage"], key=manifest["key"], path=str(Path(path).resolve()),
                       digest=manifest["digest"], status="reused", meta=manifest.get("meta", {}))


def publish(ref: ArtifactRef, out: Path) -> None:
    """Place the artifact (manifest included) at the DVC output path; hard links when the filesystem allows."""
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(ref.path, out, copy_function=link)


def plan(cfg: PipelineConfig, stage: str, args: argparse.Namespace) -> tuple[Job, str]:
    store, up = cfg.run.store, args.upstream
    if stage == "model":
        spec = cfg.student if args.role == "student" else cfg.teacher.model
        return model.plan(spec.model_dump(), store, False), "tasks.model"
    if stage == "mix":
        return mix.plan(cfg.data.model_dump(), store, False), "tasks.mix"
    if stage == "teacher":
        return teacher.plan(cfg.teacher.model_dump(), cfg.run.seed, ref_from_dir(up / "mix"),
                            ref_from_dir(up / "model/teacher"), store, False), "tasks.teacher"
    if stage == "sft":
        teacher_model = ref_from_dir(up / "model/teacher") if (up / "model/teacher").exists() else None
        return sft.plan(cfg.sft.model_dump(), args.branch, cfg.run.seed, ref_from_dir(up / "model/student"),
                        ref_from_dir(up / "teacher"), store, False, teacher_model=teacher_model), "tasks.sft"
    if stage == "merge":
        branches = {d: ref_from_dir(up / "sft" / d) for d in cfg.data.domains}
        return merge.plan(cfg.merge.model_dump(), cfg.run.seed, ref_from_dir(up / "model/student"), branches,
                          store, False), "tasks.merge"
    if stage == "rl":
        return rl.plan(cfg.rl.model_dump(), cfg.run.seed, ref_from_dir(up / "merge"), ref_from_dir(up / "mix"),
                       store, False), "tasks.rl"
    raise SystemExit(f"unknown stage {stage!r}; allowed: {', '.join(STAGES)}")


def run_eval(cfg: PipelineConfig, args: argparse.Namespace) -> ArtifactRef:
    """All evaluations and the report as one DVC stage: its output is the report folder."""
    import importlib

    up = args.upstream
    models = {"base": ref_from_dir(up / "model/student")}
    models |= {f"branch/{d}": ref_from_dir(up / "sft" / d) for d in cfg.data.domains}
    models["merged"] = ref_from_dir(up / "merge")
    if cfg.rl.enabled:
        models["rl"] = ref_from_dir(up / "rl")
    mix_ref = ref_from_dir(up / "mix")
    build = importlib.import_module("tasks.eval").build
    evals = {name: execute(eval_stage.plan(cfg.eval.model_dump(), name, ref, mix_ref, cfg.run.store, False), build)
             for name, ref in models.items()}
    return execute(report.plan(evals, cfg.run.store, False), report.build)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["params"]:
        try:
            cfg = compose(argv[1:])
        except ConfigError as err:
            print(err, file=sys.stderr)
            return 2
        Path("params.yaml").write_text(yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False))
        print("wrote params.yaml")
        return 0

    parser = argparse.ArgumentParser(prog="python -m flows.stage", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--out", type=Path, required=True, help="DVC output folder of this stage")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--upstream", type=Path, default=Path("dvc"), help="folder holding upstream DVC outputs")
    parser.add_argument("--branch", help="sft: the domain to train")
    parser.add_argument("--metrics", type=Path, help="eval: also write pass@1 per model and domain here (DVC metrics)")
    parser.add_argument("--role", choices=("student", "teacher"), default="student", help="model: which model")
    args = parser.parse_args(argv)
    try:
        cfg = validate(yaml.safe_load(args.params.read_text()))
    except ConfigError as err:
        print(f"{args.params}: {err}", file=sys.stderr)
        return 2
    if args.stage == "sft" and args.branch not in cfg.data.domains:
        print(f"--branch {args.branch!r}: allowed: {', '.join(cfg.data.domains)}", file=sys.stderr)
        return 2
    if args.stage == "eval":
        ref = run_eval(cfg, args)
    else:
        import importlib

        job, module = plan(cfg, args.stage, args)
        ref = execute(job, importlib.import_module(module).build)
    publish(ref, args.out)
    if args.stage == "eval" and args.metrics:
        args.metrics.write_text(json.dumps(ref.meta["results"], indent=2) + "\n")
    print(f"{args.stage}: {ref.status} {ref.path} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
