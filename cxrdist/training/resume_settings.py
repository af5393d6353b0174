"""What a checkpoint was trained under, checked when a run resumes from it.

Two kinds of settings are recorded in the trainer state (`settings`):
- what the sample order depends on (data/order.py: the train shards, the seed, the micro-batch `data.batch_size`, the
  global batch and the canonical partitions as resolved at the run's first start, `data.shuffle_buffer`): under other
  values the resumed run would see other samples than the uninterrupted one, some twice and some never;
- the settings whose change makes the continued run another experiment (learning rate and schedule,
  label policy, model, loss, evaluation targets: a best score under the old `eval.targets` is not
  comparable with new ones). `train.epochs` is not one of them: training a finished run for longer is
  the usual way to extend it (the cosine schedule is then stretched from the resumed step on).

The number of processes and of DataLoader workers are recorded too but never compared: the order does not depend on
them, so a run resumes on another topology (training/topology.py refuses one its partitions cannot serve).
A difference stops the resume with one line naming each setting with its old and new value, unless
`train.resume_changes=allow`. Besides the config, `eval.resampler` (who resizes for evaluation, data/spec.py) and
`eval.decode` (the side stored JPEGs are decoded at for evaluation) are recorded: a best score resized by another
implementation or from another decode is not comparable either.
"""

from __future__ import annotations

from cxrdist.data.spec import EVAL_DECODE, LEGACY_EVAL_DECODE, LEGACY_RESAMPLER, RESAMPLER
from cxrdist.errors import UserError
from cxrdist.training.topology import GLOBAL_BATCH, PARTITIONS, Topology

WORKERS, WORLD_SIZE = "data.workers", "world_size"
SAFE_CHANGES = (WORKERS, WORLD_SIZE)  # recorded, never compared: the sample order does not depend on them
EVAL_TARGETS = "eval.targets"
# Not a config key: the implementation of the evaluation resize (data/spec.py). A checkpoint that does not record
# it was trained when torchvision resized, and its best score is not comparable with Pillow-resized evaluations.
EVAL_RESAMPLER = "eval.resampler"
# Likewise the side stored JPEGs are decoded at for evaluation (data/spec.py EVAL_DECODES): not recorded = the input size.
EVAL_DECODE_SETTING = "eval.decode"
LEGACY_SCORE_SETTINGS = {EVAL_RESAMPLER: LEGACY_RESAMPLER, EVAL_DECODE_SETTING: LEGACY_EVAL_DECODE}  # what a checkpoint without them used
SCORE_DEFINING = (EVAL_TARGETS, EVAL_RESAMPLER, EVAL_DECODE_SETTING)  # a best score recorded under other values is not comparable with new ones
# Dotted prefixes of the config (training/config.py) whose values define the run.
RUN_DEFINING = (
    "seed", "data.img_size", "data.batch_size", "data.augment", "data.shuffle_buffer", "data.label_policy", "model", "loss",
    "train.lr", "train.min_lr_ratio", "train.warmup_steps", "train.weight_decay", "train.grad_clip", "train.grad_accum",
    "train.ema_decay", "train.ema_warmup", "train.ema_warmup_power", EVAL_TARGETS,
)
STARTING_POINT_ONLY = ("model.pretrained", "model.pretrained_path")  # the checkpoint's weights replace them


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and not name.startswith("data.label_policy"):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def model_settings(config: dict) -> dict:
    """The settings that define the model a run makes, without its stream: `config` is the plain config dict
    (training/config.py to_dict). The global batch and the partitions only when configured (0: resolved at the start)."""
    flat = flatten(config)
    settings = {k: v for k, v in flat.items()
                if any(k == p or k.startswith(p + ".") for p in RUN_DEFINING) and k not in STARTING_POINT_ONLY}
    settings.update({EVAL_RESAMPLER: RESAMPLER, EVAL_DECODE_SETTING: EVAL_DECODE})
    settings.update({k: flat[k] for k in (GLOBAL_BATCH, PARTITIONS) if flat.get(k)})
    return settings


def current_settings(config: dict, workers: int, topology: Topology, shards: list[str]) -> dict:
    """The settings to record: `config` is the plain config dict (training/config.py to_dict)."""
    return {**model_settings(config), WORKERS: workers, WORLD_SIZE: topology.world_size, "train_shards": list(shards),
            GLOBAL_BATCH: topology.global_batch, PARTITIONS: topology.partitions}  # as resolved, not as configured


def changed(recorded: dict, current: dict) -> dict:
    """name -> (old, new) for every setting the checkpoint recorded differently (a setting it did not record is not compared,
    except the evaluation resampler and decode: a checkpoint that records settings but not those used the legacy ones)."""
    recorded = {**LEGACY_SCORE_SETTINGS, **recorded} if recorded else recorded
    return {k: (recorded[k], v) for k, v in current.items() if k in recorded and recorded[k] != v and k not in SAFE_CHANGES}


def incomparable_score(recorded: dict, current: dict) -> list[str]:
    """The settings among SCORE_DEFINING that changed: a resume allowed to continue then drops the stored best score."""
    return [name for name in changed(recorded, current) if name in SCORE_DEFINING]


def describe(changes: dict) -> str:
    def one(name: str, old, new) -> str:
        if isinstance(old, list) and isinstance(new, list) and max(len(old), len(new)) > 3:
            gone, added = sorted(set(old) - set(new)), sorted(set(new) - set(old))
            return f"{name}: {len(old)} shards, now {len(new)} ({len(gone)} gone, e.g. {gone[:1]}; {len(added)} new, e.g. {added[:1]})"
        return f"{name}={old!r}, now {new!r}"

    return "; ".join(one(k, old, new) for k, (old, new) in changes.items())


def check_resume(path, recorded: dict, current: dict, allow: bool, say) -> list[str]:
    """Stop a resume under changed settings (one line), or with `allow` say what changed; returns the changed names."""
    changes = changed(recorded, current)
    if not changes:
        return []
    if not allow:
        raise UserError(f"checkpoint {path} was trained under other settings ({describe(changes)}): resuming would silently "
                        "continue another run; restore them, use another experiment name or train.resume=never, "
                        "or set train.resume_changes=allow to continue anyway")
    say(f"resuming {path} under changed settings (train.resume_changes=allow): {describe(changes)}")
    return list(changes)
