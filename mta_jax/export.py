"""Export a trained run's MTA adapters: `python -m mta_jax.export --workdir W --out DIR`.

    python -m mta_jax.export --workdir W [--stage stage2] [--step N] --out DIR [--full]

Writes the adapter artifact of the stage's best checkpoint by eval/score (else the latest, or
`--step`): DIR/mta_adapters.safetensors and DIR/mta_config.json (artifact_format.py). With
`--full`, also DIR/backbone/, the run's trained backbone as a Hugging Face folder with the run's
tokenizer; in the blocks whose `ffn` adapters replaced the FFN it holds the pretrained FFN
(`init_from`), or the mean of the task adapters for a randomly initialised run, which neither
runtime reads. Serve the result with `mta_jax.load_adapters`, `python -m mta_jax.predict
--adapters DIR` or `mta_jax.torch.load_mta_t5`.
"""
from __future__ import annotations

import os
import sys
import tempfile
from typing import Any, Optional

from absl import app, flags, logging

from mta_jax import artifact, cli, predict, storage
from mta_jax import artifact_format as fmt
from mta_jax.data import tokenize

# --workdir, --stage and --step are predict's flags: a checkpoint is chosen the same way.
for _name in ("workdir", "stage", "step"):
    flags.declare_key_flag(_name)
flags.DEFINE_string("out", None, "The artifact folder to write.")
flags.DEFINE_bool("full", False, "Also write the backbone (and tokenizer) to <out>/backbone.")

_DATA_FIELDS = ("tokenizer", "max_source_length", "max_target_length", "start_token",
                "start_token_id", "on_bad_row")


def export(workdir: str, out: str, *, stage: Optional[str] = None, step: Optional[int] = None,
           full: bool = False) -> dict[str, Any]:
    """Writes the artifact of a run's checkpoint (module docstring); returns its meta."""
    setup, built, params, step = predict.load_model(workdir, stage, step)
    config = setup.config
    data = {k: config.data[k] for k in _DATA_FIELDS}
    if full and data["tokenizer"] != tokenize.BYT5:
        data["tokenizer"] = ""  # the backbone folder holds it
    meta = artifact.save_adapters(out, built.model, params, data=data, eval=config.eval.to_dict(),
                                  source={"workdir": str(storage.absolute(workdir)), "stage": built.name,
                                          "step": int(step)})
    if full:
        folder = storage.path(out) / fmt.BACKBONE_DIR
        pretrained = None
        if setup.pretrained is not None and built.plug.replaces_dense:
            pretrained = setup.pretrained.backbone(built.model.config)
        stand_in = artifact.save_backbone(folder, built.model, params, pretrained=pretrained)
        save_tokenizer(setup.tokenizer, folder)
        logging.info("wrote %s; the FFN of the MTA blocks there: %s", folder, stand_in)
    return meta


def save_tokenizer(tokenizer, folder) -> None:
    """tokenizer.save_pretrained into a local or gs:// folder (transformers writes local files)."""
    if not storage.is_remote(folder):
        tokenizer.save_pretrained(os.fspath(folder))
        return
    with tempfile.TemporaryDirectory() as local:
        for name in tokenizer.save_pretrained(local):
            name = os.path.basename(name)
            storage.write_bytes(storage.path(folder) / name,
                                open(os.path.join(local, name), "rb").read())


def main(argv):
    del argv
    F = flags.FLAGS
    for name in ("workdir", "out"):
        if not F[name].value:
            print(f"error: --{name} is required", file=sys.stderr)
            return 1
    cli.quiet_libraries()
    with cli.one_line_errors():
        meta = export(F.workdir, F.out, stage=F.stage, step=F.step, full=F.full)
    size = (storage.path(F.out) / fmt.ADAPTERS_FILE).stat().length
    src = meta["source"]
    print(f"wrote {F.out}: the adapters of {src['stage']} step {src['step']} "
          f"({size / 2**20:.2f} MiB){', and the backbone' if F.full else ''}")
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
