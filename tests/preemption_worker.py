"""One process of a two-process CPU run that may be preempted (used by test_preemption.py).

python tests/preemption_worker.py PROCESS_ID PORT WORKDIR DATA_DIR STEPS

Trains a small DANN with jax.distributed on localhost (gloo collectives), as launch.py
--distributed does, and exits as launch.py would: 0 when done (printing a RESULTS line), 75 when
preempted (printing a PREEMPTED line with the step).
"""

import json
import os
import sys

import jax
from absl import logging

jax.config.update("jax_cpu_collectives_implementation", "gloo")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(process_id: int, port: int, workdir: str, data_dir: str, steps: int) -> int:
    jax.distributed.initialize(
        coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id
    )
    from configs import dann
    from tljax import stopping, train

    # The test waits for the log line of an evaluation before it sends a signal.
    logging.set_verbosity(logging.INFO)
    config = dann.get_config()
    config.data.data_dir = data_dir
    config.train.steps = steps
    config.train.batch_size = 16
    config.train.log_every = steps // 4
    config.eval.every = config.checkpoint.every = steps // 2
    config.eval.batch_size = 200
    try:
        results = train.train_and_evaluate(config, workdir)
    except stopping.PreemptedError as stop:
        print(f"PREEMPTED {stop.step}", flush=True)
        return stop.exit_code
    print("RESULTS " + json.dumps({"final": results["final"], "history": results["history"]}))
    jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])))
