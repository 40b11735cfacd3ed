"""Run a Parquet manifest through Ray Data LLM's own batch pipeline, for the `peers` suite.

Executed by the Python of an environment with Ray Data LLM and the vLLM it pins (not imported by
the project): `build_processor(vLLMEngineProcessorConfig(...))` applied to `read_parquet`, the
answers written as Parquet of `id` and `text`. Its engine stage asks Ray for a GPU, so the local
Ray gets a logical one; the model still runs on the CPU.

Usage: PYTHON jobs/bench/ray_data_llm_run.py MODEL MANIFEST OUTPUT MAX_TOKENS BATCH_SIZE CPUS
"""

from __future__ import annotations

import base64
import sys


def main(model: str, manifest: str, output: str, max_tokens: int, batch_size: int, cpus: int) -> None:
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    # Logical CPUs are reservations, not cores. Each CPU stage is an actor pool reserving a whole CPU
    # by default; with those and the engine stage on `cpus` slots the task listing the input files
    # never ran (a hang, seen here on Ray 2.60). The CPU stages get a quarter each and Ray one slot
    # more, so every stage starts; the processes share the machine's cores either way.
    ray.init(num_cpus=cpus + 1, num_gpus=1, include_dashboard=False)
    config = vLLMEngineProcessorConfig(
        model_source=model, batch_size=batch_size, concurrency=1, log_engine_metrics=False,
        engine_kwargs={"dtype": "float32", "enforce_eager": True, "max_model_len": 1024, "max_num_seqs": 32,
                       # On CPUs this is the share of the machine's memory vLLM reserves (0.92 by default,
                       # which refuses to start on a machine with anything else running).
                       "gpu_memory_utilization": 0.2},
        prepare_multimodal_stage={"enabled": True, "num_cpus": 0.25},
        chat_template_stage={"enabled": True, "num_cpus": 0.25},
        tokenize_stage={"enabled": True, "num_cpus": 0.25},
        detokenize_stage={"enabled": True, "num_cpus": 0.25},
    )

    def preprocess(row: dict) -> dict:
        url = "data:image/jpeg;base64," + base64.b64encode(row["image"]).decode()
        return {
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                       {"type": "text", "text": row["prompt"]}]}],
            "sampling_params": {"temperature": 0.0, "max_tokens": max_tokens},
            "id": row["id"],
        }

    processor = build_processor(config, preprocess=preprocess,
                                postprocess=lambda row: {"id": row["id"], "text": row["generated_text"]})
    processor(ray.data.read_parquet(manifest)).write_parquet(output)
    ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
