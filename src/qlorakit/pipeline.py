"""Train, then merge when the config asks for it (`merge.after_train`): what `qlorakit train` and
`qlorakit.api.train` run. Training and merging are sibling packages that do not import each
other; this module, above both, joins them.

A merge that is refused (no merge dtype passes the fidelity check) fails the command with one
line that says the adapter is saved and gives the `qlorakit merge` command that merges it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from qlorakit.config import Config


class AfterTrainMergeError(RuntimeError):
    """Training finished and its adapter is saved, but the merge asked for was refused."""


def train_then_merge(cfg: Config, *, overwrite: bool = False, progress: bool = True, **train_options):
    """`train.loop.train(cfg)`, then, on the main process and when `cfg.merge.after_train`, the merge of
    `qlorakit merge RUN --out RUN/merged` with the config's merge options. Returns (TrainResult,
    MergeResult or None).

    Raises:
        AfterTrainMergeError: the merge was refused; the run directory and its adapter are complete.
    """
    from qlorakit.train.loop import train

    result = train(cfg, overwrite=overwrite, progress=progress, **train_options)
    if not (cfg.merge.after_train and result.is_main):
        return result, None
    return result, merge_after_training(cfg, result)


def merge_after_training(cfg: Config, result):
    """Merge the model `train` returned into <run>/merged (module docstring)."""
    from qlorakit.merge.fidelity import UnfaithfulMergeError
    from qlorakit.merge.run import format_merge, merge_loaded, merge_run
    from qlorakit.models.load import LoadedModel

    m, run_dir = cfg.merge, Path(result.run_dir)
    options = dict(dtype=m.dtype, into=m.into, lm_head_dtype=m.lm_head_dtype, untie_embeddings=m.untie_embeddings)
    try:
        if result.model is None:  # an fsdp run: no rank held the whole model, so it is restored from the run directory
            merged = merge_run(run_dir, run_dir / "merged", **options)
        else:
            loaded = LoadedModel(result.model, result.tokenizer, result.source)
            merged = merge_loaded(loaded, cfg, run_dir / "merged", spec=result.spec, **options)
    except UnfaithfulMergeError as error:
        command = f"qlorakit merge {run_dir} --out {run_dir / 'merged'} --dtype fp32"
        raise AfterTrainMergeError(
            f"training finished and the adapter is saved in {run_dir / 'adapter'}, but merge.after_train was refused: "
            f"{error}; merge it with `{command}` (add --force to keep an unfaithful merge)"
        ) from None
    print(format_merge(merged), file=sys.stderr, flush=True)
    return merged
