"""One process of a two-process CPU run (used by test_distributed.py).

python tests/multiprocess_worker.py PROCESS_ID PORT WORKDIR DATA_DIR
"""

import json
import os
import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(process_id: int, port: int, workdir: str, data_dir: str) -> None:
    jax.distributed.initialize(
        coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id
    )
    from configs import dann
    from tljax import train

    config = dann.get_config()
    config.data.data_dir = data_dir
    config.train.steps = 4
    config.train.batch_size = 8
    config.eval.every = 4
    config.eval.batch_size = 200
    config.checkpoint.every = 2
    results = train.train_and_evaluate(config, workdir)
    print(
        "RESULTS "
        + json.dumps(
            {
                "process": jax.process_index(),
                "final": results["final"],
                "num_devices": results["num_devices"],
            }
        )
    )
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
