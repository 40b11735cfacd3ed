"""Run rows through vLLM's offline `LLM.generate`, for the `peers` suite (see jobs/bench/peers.py).

This file is executed by the Python of a vLLM environment, not imported by the project: it needs
vLLM, Pillow and the standard library only. It reads a job (JSON: the checkpoint, the rows, the
warm-up rows) from the file named on the command line and writes the tokens of every row and the
seconds the timed `generate` took to the second file named.

Usage: VLLM_PYTHON jobs/bench/vllm_run.py JOB.json RESULT.json
"""

from __future__ import annotations

import io
import json
import sys
import time


def main(job_path: str, result_path: str) -> None:
    from PIL import Image
    from vllm import LLM, SamplingParams

    with open(job_path) as f:
        job = json.load(f)
    started = time.perf_counter()
    llm = LLM(model=job["model"], dtype="float32", enforce_eager=True, max_model_len=job["max_model_len"],
              max_num_seqs=job["max_num_seqs"], limit_mm_per_prompt={"image": 1}, seed=0)
    load_s = time.perf_counter() - started

    def inputs(rows):
        prompts, params = [], []
        for row in rows:
            with open(row["image"], "rb") as f:
                image = Image.open(io.BytesIO(f.read())).convert("RGB")
            prompts.append({"prompt": row["prompt"], "multi_modal_data": {"image": image}})
            params.append(SamplingParams(max_tokens=row["max_tokens"], temperature=0.0))
        return prompts, params

    warm_prompts, warm_params = inputs(job["warm"])
    llm.generate(warm_prompts, warm_params, use_tqdm=False)
    prompts, params = inputs(job["rows"])
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    result = {"seconds": seconds, "load_s": load_s,
              "tokens": [list(o.outputs[0].token_ids) for o in outputs],
              "prompt_tokens": [len(o.prompt_token_ids) for o in outputs]}
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
