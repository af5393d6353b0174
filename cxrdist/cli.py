"""The `cxrdist` command: parses arguments and hands each subcommand to its module."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

from cxrdist.cli_args import CommandParser, UsageError, number, whole
from cxrdist.errors import UserError, one_line
from cxrdist.text import count

EXIT_USER_ERROR = 2
LOGGING_TO_WANDB = ("train", "lodo", "evaluate", "report", "demo")  # commands whose W&B mode is checked before any work


def add_synth(sub) -> None:
    p = sub.add_parser("synth", help="write synthetic chest radiographs and a generic label CSV")
    p.add_argument("--out", type=Path, required=True, help="folder to write: images/ and labels.csv (the input of `cxrdist prepare`)")
    p.add_argument("--n", type=whole(1), default=3000, help="how many radiographs (default: %(default)s)")
    p.add_argument("--size", type=whole(1), default=256, help="side of the square images in pixels (default: %(default)s)")
    p.add_argument("--seed", type=whole(0), default=0, help="random seed: the same seed writes the same images and labels (default: %(default)s)")
    p.add_argument("--workers", type=whole(1), default=1, help="processes that draw the images (default: %(default)s)")
    p.add_argument("--planted-coupling", type=number(0, 1), default=None, metavar="F",
                   help="add a 'Planted Target' (a noisy copy of Pleural Effusion with no mark of its own, labelled for a fraction F "
                        "of the patients, -1 elsewhere) and two independent controls; the full truth goes to labels_full.csv")
    p.add_argument("--planted-gap", metavar="LABEL:ATTRIBUTE=VALUE:STRENGTH",
                   help="draw LABEL's mark at STRENGTH (0-1) on one group's images (sex=F, view=AP or age=60-90), labels unchanged: "
                        "a subgroup failure for the audit to find, e.g. 'Pleural Effusion:sex=F:0.3'")
    p.add_argument("--planted-shortcut", metavar="LABEL",
                   help="a marker on AP films, on 90%% of those whose study has LABEL and 10%% of the others: a shortcut")
    p.set_defaults(run=run_synth)


def run_synth(args) -> int:
    from cxrdist.data.synth.dataset import make_synthetic_dataset

    csv = make_synthetic_dataset(args.out, n=args.n, size=args.size, seed=args.seed, workers=args.workers, planted_coupling=args.planted_coupling,
                                 planted_gap=args.planted_gap, planted_shortcut=args.planted_shortcut)
    print(f"wrote {args.n} synthetic radiographs and {csv}")
    return 0


def add_labels(sub) -> None:
    p = sub.add_parser("labels", help="print the built-in label synonyms: each source's names, the harmonised name they train as, and "
                                      "why a name is kept apart (a source that defines it its own way), tab-separated")
    p.set_defaults(run=run_labels)


def run_labels(args) -> int:
    from cxrdist.labels.harmonise import synonym_table

    for row in synonym_table():
        print(*row, sep="\t")
    return 0


def add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="label CSV + images -> patient-grouped MIS folds -> WebDataset shards")
    p.add_argument("--source", choices=["csv", "chexpert", "nih", "mimic"], default="csv",
                   help="the label table's layout: a generic CSV (path, patient, label columns) or a public dataset's (default: %(default)s)")
    p.add_argument("--csv", type=Path, required=True,
                   help="label table (generic CSV, CheXpert train.csv, NIH Data_Entry_2017.csv, MIMIC chexpert CSV)")
    p.add_argument("--images", type=Path, help="root the CSV's image paths are relative to")
    p.add_argument("--out", type=Path, help="shard directory to write")
    p.add_argument("--metadata", type=Path, help="MIMIC-CXR: mimic-cxr-2.0.0-metadata.csv (default: next to --csv)")
    p.add_argument("--labels", help="'chexpert', 'nih' or comma-separated label columns (default: the source's set)")
    p.add_argument("--folds", type=whole(2), default=5, help="cross-validation folds, grouped by patient (default: %(default)s)")
    test = p.add_mutually_exclusive_group()
    test.add_argument("--test-fraction", type=number(0, 1, below_maximum=True), default=0.0,
                      help="fraction of the patients held out as the test split (default: %(default)s)")
    test.add_argument("--test-list", type=Path, help="file listing the test images, one per line (NIH test_list.txt)")
    p.add_argument("--max-size", type=whole(16), default=512, help="long side of the stored images, in pixels (default: %(default)s)")
    p.add_argument("--format", dest="fmt", choices=["jpg", "png"], default="jpg", help="image format in the shards (default: %(default)s)")
    p.add_argument("--quality", type=whole(1, 100), default=95, help="JPEG quality (default: %(default)s)")
    p.add_argument("--samples-per-shard", type=whole(1), default=1000, help="images per tar shard (default: %(default)s)")
    p.add_argument("--views", choices=["all", "frontal"], default="all", help="frontal: keep only PA/AP images (default: %(default)s)")
    p.add_argument("--on-bad-image", choices=["error", "skip"], default="error",
                   help="skip: leave out missing and unreadable images, listed in the manifest (default: %(default)s)")
    p.add_argument("--no-patient-grouping", action="store_true", help="accept a CSV without a 'patient' column (every image its own patient)")
    p.add_argument("--allow-outside-images", action="store_true", help="read CSV paths that lead outside --images (../, absolute, symlinks)")
    p.add_argument("--workers", type=whole(1), default=1, help="processes that write shards (default: %(default)s)")
    p.add_argument("--seed", type=whole(0), default=0, help="seed of the fold and test assignment and of the shard order (default: %(default)s)")
    p.add_argument("--attributes", metavar="NAME[=COLUMN],...",
                   help="more attributes for the subgroup audit (never a model input): columns of the CSV (MIMIC: of its metadata CSV) "
                        "or of --attributes-table; a name 'sex' or 'age' is typed as such. Always kept: the view, and CheXpert's "
                        "Sex/Age, NIH's Patient Gender/Patient Age")
    p.add_argument("--attributes-table", type=Path, metavar="FILE", help="a CSV of attributes kept elsewhere, one row per patient "
                                                                          "(or image path), e.g. MIMIC-IV's patients.csv")
    p.add_argument("--attributes-join", choices=["patient", "path"], default="patient",
                   help="what the table's key column holds: patient ids or image paths (default: %(default)s)")
    p.add_argument("--attributes-key", metavar="COLUMN", help="the table's key column (default: the --attributes-join name), "
                                                              "e.g. subject_id")
    p.add_argument("--age-bins", metavar="A,B,...", help="lower age edges of the audit's age groups (default: 18,40,60,80)")
    folds = p.add_mutually_exclusive_group()
    folds.add_argument("--folds-only", type=Path, metavar="FILE", help="only compute the folds and write (path, patient, split) to FILE")
    folds.add_argument("--folds-from", type=Path, metavar="FILE", help="use the fold assignment in FILE")
    p.set_defaults(run=run_prepare)


def run_prepare(args) -> int:
    from cxrdist.data.ingest.prepare import PrepareOptions, prepare

    if args.folds_only is None and (args.images is None or args.out is None):
        raise UserError("prepare needs --images and --out (or --folds-only FILE to only compute the folds)")
    opts = PrepareOptions(**{k: v for k, v in vars(args).items() if k not in ("command", "run", "command_line")})
    manifest = prepare(opts)
    if manifest is not None:
        total = sum(s.num_samples for s in manifest.splits.values())
        print(f"wrote {count(total, 'sample')} in {count(sum(len(s.shards) for s in manifest.splits.values()), 'shard')} to {args.out}")
        skipped = manifest.skipped_images
        if skipped["count"]:
            unreadable = skipped["count"] - skipped["missing"]
            print(f"skipped {count(skipped['count'], 'image')} ({skipped['missing']} missing, {unreadable} unreadable; listed in manifest.json)")
    return 0


def add_verify(sub) -> None:
    p = sub.add_parser("verify", help="re-read every shard and check it against manifest.json")
    p.add_argument("dir", help="the shard directory, or its URL (s3://..., https://...)")
    p.set_defaults(run=run_verify)


def run_verify(args) -> int:
    from cxrdist.data.location import display
    from cxrdist.data.manifest import manifest_location
    from cxrdist.data.datasets import load_manifest
    from cxrdist.data.shards import verify_shards

    totals = verify_shards(args.dir, load_manifest(args.dir))
    print(f"ok: {count(totals['shards'], 'shard')}, {count(totals['samples'], 'sample')} match {display(manifest_location(args.dir))}")
    return 0


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train one fold (or all) by running `accelerate launch cxrdist/train.py` for you")
    p.add_argument("--config", type=Path, required=True, help="experiment YAML, e.g. configs/paper.yaml")
    p.add_argument("--fold", default=None, help="fold number, or 'all' for every fold in turn (default: the config's)")
    p.add_argument("--processes", type=whole(1), default=None, help="processes on this machine (default: GPUs, or 1 on CPU)")
    p.add_argument("--launch-config", type=Path, default=None, help="an accelerate config file (launch/*.yaml)")
    p.add_argument("--max-restarts", type=int, default=0,
                   help="restart trainers that fail (a lost rank or node) up to N times in this job, resuming from the newest checkpoint "
                        "(default: %(default)s; never after a user error)")
    p.add_argument("--ablate", choices=["refine"], default=None,
                   help="also train EXPERIMENT-norefine (model.refine.enabled=false) on the same folds, seed and data, after the experiment")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.epochs=3")
    p.set_defaults(run=run_train)


def run_train(args) -> int:
    from cxrdist.log import TERMINAL_ENV, on_terminal
    from cxrdist.training.cluster.elastic import check_max_restarts
    from cxrdist.training.launcher.launch import ablation_arms, folds_to_train
    from cxrdist.training.launcher.notes import collected_notes
    from cxrdist.training.cluster.preempt import RESUME_COMMAND_ENV, ReceivedSignals

    check_max_restarts(args.max_restarts)
    arms = ablation_arms(args.config, args.overrides, args.ablate)
    folds = folds_to_train(args.config, args.fold, args.overrides)
    # The trainers leave saying how to resume to this command, and draw progress bars only if our stderr is a terminal.
    trainer_env = {RESUME_COMMAND_ENV: args.command_line, TERMINAL_ENV: os.environ.get(TERMINAL_ENV) or str(int(on_terminal()))}
    with environment(trainer_env), ReceivedSignals() as received, collected_notes():
        for overrides in arms:
            for fold in folds:
                code = train_fold(args, fold, overrides, received)
                if code != 0:
                    return code
    return 0


def train_fold(args, fold: int | None, overrides: list[str], received) -> int:
    from cxrdist.training.launcher.launch import launch_fold
    from cxrdist.training.cluster.preempt import EXIT_PREEMPTED, signal_meaning

    code = launch_fold(args.config, fold, overrides, args.processes, args.launch_config, args.max_restarts)
    if code == EXIT_PREEMPTED:
        stopped_by = received.collect()
        why = signal_meaning(stopped_by[0]) if stopped_by else "a stop request the trainers received"
        which = "the fold" if fold is None else f"fold {fold}"
        print(f"cxrdist train: stopped by {why}; {which} saved a checkpoint; to resume, run the same command again: {args.command_line}",
              file=sys.stderr)
    return code


@contextmanager
def environment(values: dict[str, str]):
    """os.environ with `values` set (the processes started inside inherit them), restored afterwards."""
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def add_lodo(sub) -> None:
    p = sub.add_parser("lodo", help="leave-one-dataset-out: for each dataset of data.shards in turn, train every fold on the others "
                                    "(experiment EXPERIMENT-without-NAME) and evaluate on the one left out; summary in runs/EXP/lodo/lodo.json")
    p.add_argument("--config", type=Path, required=True, help="experiment YAML whose data.shards lists at least 2 datasets")
    p.add_argument("--processes", type=whole(1), default=None, help="training processes on this machine (default: GPUs, or 1 on CPU)")
    p.add_argument("--launch-config", type=Path, default=None, help="an accelerate config file (launch/*.yaml) for training")
    p.add_argument("--external-split", choices=["all", "test"], default="all",
                   help="what of the left-out dataset is scored: all of it, or its test split (default: %(default)s)")
    p.add_argument("--batch-size", type=whole(1), default=64, help="images per forward pass in the evaluations (default: %(default)s)")
    p.add_argument("--workers", type=whole(0), default=2, help="data-loading worker processes of the evaluations (default: %(default)s)")
    p.add_argument("--resamples", type=whole(0), default=1000,
                   help="patient bootstrap resamples of the evaluations' 95%% intervals (default: %(default)s)")
    p.add_argument("--evaluate-only", action="store_true", help="train nothing: every fold must be finished (slurm/lodo.sh's last job)")
    p.add_argument("--plan", action="store_true", help="only print, per held-out run, NAME, EXPERIMENT and its data.shards override, "
                                                       "tab-separated (what slurm/lodo.sh submits)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.epochs=3")
    p.set_defaults(run=run_lodo)


def run_lodo(args) -> int:
    from cxrdist.lodo import Settings, TrainingStopped, plan, run_lodo as lodo
    from cxrdist.log import TERMINAL_ENV, on_terminal
    from cxrdist.training.cluster.preempt import EXIT_PREEMPTED, RESUME_COMMAND_ENV

    if args.plan:
        from cxrdist.training.config import load_config

        cfg = load_config(args.config, args.overrides)
        for run in plan(cfg.data.shards, cfg.experiment):
            print(run.held_out.name, run.experiment, run.shards_override(), sep="\t")
        return 0
    settings = Settings(args.config, list(args.overrides), args.processes, args.launch_config, args.external_split, args.resamples,
                        args.batch_size, args.workers, args.evaluate_only)
    trainer_env = {RESUME_COMMAND_ENV: args.command_line, TERMINAL_ENV: os.environ.get(TERMINAL_ENV) or str(int(on_terminal()))}
    with environment(trainer_env):
        try:
            lodo(settings)
        except TrainingStopped as stopped:
            if stopped.code == EXIT_PREEMPTED:
                print(f"cxrdist lodo: {stopped.where} saved a checkpoint and stopped; to resume, run the same command again: "
                      f"{args.command_line}", file=sys.stderr)
            return stopped.code
    return 0


def add_info(sub) -> None:
    p = sub.add_parser("info", help="print 'EXPERIMENT OUTPUT_DIR NUM_FOLDS' (tab-separated) for a config (the fold count from the shards' manifest)")
    p.add_argument("--config", type=Path, required=True, help="experiment YAML, e.g. configs/paper.yaml")
    p.add_argument("--no-manifest", dest="manifest", action="store_false", help="do not read the manifest (NUM_FOLDS is printed as 0)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.set_defaults(run=run_info)


def run_info(args) -> int:
    from cxrdist.training.launcher.launch import experiment_info

    experiment, output_dir, folds = experiment_info(args.config, args.overrides, read_manifest=args.manifest)
    print(experiment, output_dir, folds, sep="\t")  # tabs: slurm/train_folds.sh reads an output_dir with spaces whole
    return 0


def add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="fold ensemble x flip TTA on a prepared split -> predictions.csv + metrics.json")
    p.add_argument("--runs", type=Path, required=True, help="runs/EXP (every fold-*/best), one fold-K dir, or a best/ dir")
    p.add_argument("--split", default="test", help="'test' or a fold, e.g. fold-0 (default: %(default)s)")
    p.add_argument("--no-tta", dest="tta", action="store_false", help="no horizontal-flip TTA")
    p.add_argument("--out", type=Path, help="default: runs/EXP/ensemble")
    p.add_argument("--batch-size", type=whole(1), default=64, help="images per forward pass (default: %(default)s)")
    p.add_argument("--workers", type=whole(0), default=2, help="data-loading worker processes (default: %(default)s)")
    p.add_argument("--shards", help="the shard directory or URL (s3://, https://), if it moved since training")
    p.add_argument("--resamples", type=whole(0), default=1000, help="patient bootstrap resamples for the 95%% intervals (default: %(default)s)")
    p.add_argument("--external", help="score on this prepared dataset the models were not trained on (a directory or URL), over the labels "
                                      "both share; --split all reads all of it")
    p.add_argument("--leave-out-overlap", action="store_true",
                   help="with --external: leave out (and count) its images that are the same radiographs as, or of the same patients "
                        "as, the data the models were trained and tested on, instead of refusing the dataset")
    p.add_argument("--eval-targets", choices=["ignore_uncertain", "zeros", "ones"], default=None,
                   help="what the AUCs score against, whatever the training policy: uncertain (-1) entries left out (ignore_uncertain), "
                        "negative (zeros) or positive (ones); default: what the model cards record, else ignore_uncertain")
    p.add_argument("--min-group-patients", dest="min_patients", type=whole(1), default=20,
                   help="subgroup audit: a group with fewer patients shows 'too few patients', no number (default: %(default)s)")
    p.add_argument("--intersect", action="append", default=None, metavar="A,B",
                   help="subgroup audit: also the groups of two attributes crossed, e.g. --intersect sex,age (repeatable; default: none)")
    p.set_defaults(run=run_evaluate)


def run_evaluate(args) -> int:
    from cxrdist.evaluation.prediction.ensemble import result_line, run_evaluate as evaluate

    if args.leave_out_overlap and not args.external:
        raise UserError("--leave-out-overlap only applies to --external DATASET")

    metrics = evaluate(args.runs, args.split, args.tta, args.out, args.batch_size, args.workers, shards=args.shards, resamples=args.resamples,
                       eval_targets=args.eval_targets, external=args.external, leave_out_overlap=args.leave_out_overlap,
                       min_patients=args.min_patients, intersections=args.intersect or [])
    if metrics:
        from cxrdist.evaluation.report.dashboard import log_ensemble_run

        log_ensemble_run(args.runs, metrics, Path(metrics["out"]))
        print(result_line(metrics))
        if len(metrics.get("per_dataset", {})) > 2:
            from cxrdist.evaluation.scoring.by_dataset import summary_line

            print(f"per dataset: {summary_line(metrics['per_dataset'])}")
    return 0


def add_predict(sub) -> None:
    p = sub.add_parser("predict", help="fold ensemble on PNG/JPEG/DICOM files or folders")
    p.add_argument("--runs", type=Path, required=True, help="runs/EXP (every fold-*/best), one fold-K dir, or a best/ dir")
    p.add_argument("--images", type=Path, nargs="+", required=True, help="files or folders")
    p.add_argument("--out", type=Path, default=Path("preds.csv"),
                   help="CSV to write: path, one probability per label and, when `cxrdist evaluate` chose operating points for these "
                        "models, each decision beside it (default: %(default)s)")
    p.add_argument("--no-tta", dest="tta", action="store_false", help="no horizontal-flip TTA")
    p.add_argument("--batch-size", type=whole(1), default=32, help="images per forward pass (default: %(default)s)")
    p.add_argument("--workers", type=whole(0), default=2, help="image-reading worker processes (default: %(default)s)")
    p.add_argument("--cam", type=Path, metavar="DIR", help="also write Grad-CAM overlays (one PNG per image and finding) to DIR")
    p.add_argument("--cam-threshold", type=number(0, 1), default=0.5, help="explain findings with at least this probability (default: %(default)s)")
    p.add_argument("--cam-top", type=whole(1), default=3, help="at most this many findings per image (default: %(default)s)")
    p.add_argument("--operating-point", default="sens@spec90", choices=["sens@spec90", "sens@spec95", "spec@sens90", "spec@sens95"],
                   help="the thresholds of call_<label> (positive/negative) beside each probability: the specificity (sens@specNN) or "
                        "sensitivity (spec@sensNN) they keep on the out-of-fold predictions, from `cxrdist evaluate` of the same "
                        "models (default: %(default)s)")
    p.set_defaults(run=run_predict)


def run_predict(args) -> int:
    from cxrdist.evaluation.prediction.predict import run_predict as predict

    out = predict(args.runs, args.images, args.out, tta=args.tta, batch_size=args.batch_size, workers=args.workers,
                  cam=args.cam, cam_threshold=args.cam_threshold, cam_top=args.cam_top, operating_point=args.operating_point)
    print(f"wrote {out}")
    return 0


def add_export(sub) -> None:
    p = sub.add_parser("export", help="the fold ensemble as one ONNX or TorchScript file + a JSON sidecar")
    p.add_argument("--runs", type=Path, required=True, help="runs/EXP (every fold-*/best), one fold-K dir, or a best/ dir")
    p.add_argument("--format", dest="fmt", choices=["onnx", "torchscript"], required=True, help="onnx (needs the export extra) or torchscript")
    p.add_argument("--out", type=Path, required=True, help="the model file; the sidecar is written to OUT.json")
    p.add_argument("--tta", action="store_true", help="average with the mirrored image (flip TTA) inside the model")
    p.add_argument("--metrics", type=Path, help="metrics.json with the thresholds (default: runs/EXP/ensemble/metrics.json)")
    p.set_defaults(run=run_export)


def run_export(args) -> int:
    from cxrdist.evaluation.prediction.export import PREPROCESSOR_FILE, run_export as export

    out = export(args.runs, args.fmt, args.out, tta=args.tta, metrics=args.metrics)
    print(f"wrote {out}, {out}.json and {out.parent / PREPROCESSOR_FILE} (its preprocessor)")
    return 0


def add_report(sub) -> None:
    p = sub.add_parser("report", help="one HTML page with figures about an experiment")
    p.add_argument("--runs", type=Path, required=True, help="the experiment directory, runs/EXP")
    p.add_argument("--out", type=Path, help="default: runs/EXP/report")
    p.add_argument("--shards", help="the shard directory or URL (s3://, https://), if it moved since training")
    p.add_argument("--patient-ids", choices=["show", "hide"], default=None,
                   help="patient ids on the sample images (default: hide for data prepared with --source csv, which may be a hospital's; "
                        "show for the public datasets)")
    p.set_defaults(run=run_report)


def run_report(args) -> int:
    from cxrdist.evaluation.report.dashboard import log_report_artifact
    from cxrdist.evaluation.report.report import run_report as report

    page = report(args.runs, args.out, shards=args.shards, patient_ids=None if args.patient_ids is None else args.patient_ids == "show")
    log_report_artifact(args.runs, page)
    print(f"report: {page}")
    return 0


def add_compare(sub) -> None:
    p = sub.add_parser("compare", help="two experiments on the same images: macro AUCs per fold and on the test split, "
                                       "paired difference B - A with a paired patient-bootstrap interval")
    p.add_argument("runs_a", type=Path, metavar="RUNS_A", help="the baseline, e.g. runs/EXP-norefine")
    p.add_argument("runs_b", type=Path, metavar="RUNS_B", help="the candidate, e.g. runs/EXP")
    p.add_argument("--split", default="test", help="the split of both arms' ensemble/predictions.csv (from `cxrdist evaluate`; default: %(default)s)")
    p.add_argument("--out", type=Path, help="where compare.json goes (default: RUNS_B/compare, which `cxrdist report` shows)")
    p.add_argument("--resamples", type=whole(2), default=1000, help="paired patient bootstrap resamples (default: %(default)s)")
    p.add_argument("--seed", type=whole(0), default=0, help="seed of the bootstrap (default: %(default)s)")
    p.set_defaults(run=run_compare)


def run_compare(args) -> int:
    from cxrdist.evaluation.scoring.compare import format_table, run_compare as compare

    result = compare(args.runs_a, args.runs_b, split=args.split, out=args.out, resamples=args.resamples, seed=args.seed)
    print(format_table(result))
    print(f"wrote {result['out']}")
    return 0


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on synthetic data, on this CPU")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for the data, runs and report (default: demo-out, with --two-datasets demo-out-two-datasets); "
                        "a second run there reuses what the first finished")
    p.add_argument("--two-datasets", action="store_true",
                   help="two synthetic hospitals prepared separately, trained on together, plus external validation on a third")
    p.set_defaults(run=run_demo)


def run_demo(args) -> int:
    if args.two_datasets:
        from cxrdist.demo.two_datasets import run_two_dataset_demo

        return run_two_dataset_demo(args.out)
    from cxrdist.demo.one_dataset import run_demo as demo

    return demo(args.out if args.out is not None else Path("demo-out"))


def build_parser() -> CommandParser:
    parser = CommandParser(prog="cxrdist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_synth, add_labels, add_prepare, add_verify, add_train, add_lodo, add_info, add_evaluate, add_predict, add_export, add_report,
                add_compare, add_demo):
        add(sub)
    return parser


EXIT_BROKEN_PIPE = 128 + 13  # what a command killed by SIGPIPE returns (`seq 1000000 | head -1`)


def reader_gone() -> int:
    """The reader of our output went away (`cxrdist labels | head -1`): no traceback, and nothing more written to the closed
    pipe (Python would try again when it flushes stdout at exit: point stdout at /dev/null)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_BROKEN_PIPE


def command_line(argv: list[str] | None) -> str:
    """How the user ran this command (`cxrdist ...` or `python -m cxrdist ...`), to repeat in messages: every URL in it
    in its display form (no user:password@, no query token), as the launch line and the cards show it."""
    import shlex

    from cxrdist.data.location import redact

    if argv is not None or Path(sys.argv[0]).name == "cxrdist":
        return redact(shlex.join(["cxrdist", *(sys.argv[1:] if argv is None else argv)]))
    return redact(shlex.join(sys.orig_argv))


def main(argv: list[str] | None = None) -> int:
    from cxrdist.log import quiet_third_party

    quiet_third_party()
    try:
        args, unknown = build_parser().parse_known_args(argv)
        if unknown:  # named after the subcommand they were given to, whose --help lists what it takes
            raise UsageError(f"cxrdist {args.command}", f"unrecognized arguments: {' '.join(unknown)}")
    except UsageError as err:
        print(f"{err.prog}: error: {one_line(err)}", file=sys.stderr)
        return EXIT_USER_ERROR
    args.command_line = command_line(argv)
    try:
        if args.command in LOGGING_TO_WANDB:
            from cxrdist.wandb_settings import check_wandb_mode_variable

            check_wandb_mode_variable()
        code = args.run(args)
        sys.stdout.flush()  # here, so that a reader gone by now is this handler's, not a page at exit
        return code
    except BrokenPipeError:
        return reader_gone()
    except UserError as err:
        print(f"cxrdist {args.command}: error: {one_line(err)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as err:
        from cxrdist.atomic import filesystem_error

        line = filesystem_error(err)
        if line is None:
            raise
        print(f"cxrdist {args.command}: error: {line}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"cxrdist {args.command}: interrupted", file=sys.stderr)
        return 130
