"""Entry point: `python -m mta_jax.main --config=configs/demo.py --workdir=/tmp/mta_demo`.

Every config field can be overridden on the command line, e.g. `--config.mta.top_k=1`.
A user error (config, paths, data, checkpoints) exits 1 with one line `error: ...`; a
non-finite loss exits 2 naming the step; SIGTERM saves a checkpoint and exits 0, and the
same command resumes.
"""
import sys

from absl import flags, logging
from ml_collections import config_flags

from mta_jax import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and predictions.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    cli.quiet_libraries()
    from mta_jax import step, train
    from mta_jax.errors import TrainingError, UserError
    try:
        with cli.one_line_errors():
            if len(argv) > 1:
                raise UserError(f"unexpected arguments: {argv[1:]}")
            # Before any TPU is opened; the same flags mta_jax.compile compiles with.
            cli.add_libtpu_flags(step.libtpu_flags(FLAGS.config.train.rng_impl))
            train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except train.Preempted:
        logging.warning("preempted: checkpoint saved; rerun the same command to resume")
        return 0
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def run():
    cli.run(main)  # a bad flag, config file or override is one line `error: ...` too


if __name__ == "__main__":
    run()
