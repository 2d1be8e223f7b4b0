"""What the Ray executor's tests inject into their Ray workers (runtime_env's
``worker_process_setup_hook``), kept out of the package: every training checkpoints every 2
iterations; the first to write a checkpoint while the file ``$MCWT_TEST_KILL_FLAG`` exists
deletes it and kills its worker process (a task lost mid-training, for Ray to retry); kills and
trainings that start from a checkpoint are logged, one line each, to ``$MCWT_TEST_EVENTS``."""
import os
from pathlib import Path


def worker_setup() -> None:
    import mcwt_ext.train as train_mod
    from mcwt_ext.runs import RunDir
    from mcwt_ext.train_config import TrainConfig

    flag, events = Path(os.environ["MCWT_TEST_KILL_FLAG"]), Path(os.environ["MCWT_TEST_EVENTS"])
    real_write, real_train = train_mod.atomic_write, train_mod.train

    def log(line):
        with open(events, "a") as f:
            f.write(line + "\n")

    def write(path, data):
        real_write(path, data)
        if Path(path).name == Path(RunDir.CHECKPOINT).name:
            try:
                flag.unlink()  # one worker wins the kill
            except FileNotFoundError:
                return
            log(f"killed {Path(path).parent.parent}")
            os._exit(1)

    def train(model, dataset, masks=None, config=None, run_dir=None, *a, **kw):
        if run_dir is not None and RunDir(run_dir).exists(RunDir.CHECKPOINT):
            log(f"resumed {RunDir(run_dir).path}")
        return real_train(model, dataset, masks, config, run_dir, *a, **kw)

    TrainConfig.checkpoint_due = lambda self, iteration, seconds: iteration % 2 == 0
    train_mod.atomic_write, train_mod.train = write, train
