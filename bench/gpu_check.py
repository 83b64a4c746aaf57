"""TiM4Rec's Triton path against its PyTorch path on one GPU, at the three settings of the paper.

For each setting: one real training batch of the dataset, one set of weights, and
- the errors of the Triton path (float32) and of the PyTorch path (float32), each against the
  PyTorch path in float64: loss, full-sort scores and every parameter's gradient (relative norms);
- the first training step of each path (Triton: includes compiling and autotuning the kernels), the
  median step over 20 after warm-up (forward, backward, Adam), and the peak GPU memory;
- RecBole's SASRec (2 layers, 2 heads, same width, CE) on the same batch: the step-time yardstick.

    python bench/gpu_check.py --data_path=DIR [--settings a,b,c] [--json OUT.json]

DIR holds amazon-sports/ and ml-1m-half/ (the shared atomic files). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

from common import (SETTINGS, errors_against_float64, gpu_environment, seeded_model,
                    setting_config, setting_data, time_steps, write_json)


def timed(model, batch) -> dict:
    """First step (s), median step (ms) and peak memory (GB) of the eager step, in train mode."""
    row = time_steps(model, batch, graph=False, anomaly=False)
    return {key: row[key] for key in ("first_s", "step_ms", "peak_gb")}


def run_setting(name, data_path):
    import torch
    from recbole.model.sequential_recommender import SASRec

    config, model_class = setting_config(None, name, data_path)
    dataset, _, _, batch = setting_data(config)
    batch = batch.to("cuda")
    state = seeded_model(model_class, config, dataset, seed=0, ssd_backend="torch").state_dict()

    def build(backend):
        model = seeded_model(model_class, config, dataset, seed=0, ssd_backend=backend)
        model.load_state_dict(state)
        return model

    row = {"setting": name, "config": SETTINGS[name][0], "dataset": SETTINGS[name][1],
           "batch": len(batch[config["ITEM_LIST_LENGTH_FIELD"]]),
           "length": config["MAX_ITEM_LIST_LENGTH"], "hidden": config["hidden_size"]}

    # Timed first: the Triton path's first step then includes this process's compile and autotune.
    for backend in ("triton", "torch"):
        row[backend] = timed(build(backend), batch)
        torch.cuda.empty_cache()

    sas_config = copy.deepcopy(config)
    for key, value in dict(n_layers=2, n_heads=2, inner_size=4 * config["hidden_size"],
                           hidden_dropout_prob=0.2, attn_dropout_prob=0.2, hidden_act="gelu",
                           layer_norm_eps=1e-12, initializer_range=0.02, loss_type="CE").items():
        sas_config[key] = value
    row["SASRec"] = timed(seeded_model(SASRec, sas_config, dataset, seed=0), batch)
    torch.cuda.empty_cache()
    row["errors"] = errors_against_float64(build, ("triton", "torch"), "torch", batch)
    return row


def markdown(rows):
    lines = ["| setting | B x L, D | path | loss err | scores err | max grad err (param) |"
             " first step s | median step ms | step / SASRec | peak GB |", "|" + "---|" * 10]
    for r in rows:
        shape = f"{r['dataset']} {r['batch']} x {r['length']}, {r['hidden']}d"
        for path in ("triton", "torch", "SASRec"):
            e = r["errors"].get(path)
            errs = (f"{e['loss']:.1e} | {e['scores']:.1e} | {e['grads_max']:.1e} "
                    f"({e['grads_max_param'].split('.', 1)[-1]})" if e else "- | - | -")
            t = r[path]
            lines.append(f"| {r['setting']} | {shape} | {path} | {errs} | {t['first_s']:.2f} | "
                         f"{t['step_ms']:.1f} | {t['step_ms'] / r['SASRec']['step_ms']:.2f} | "
                         f"{t['peak_gb']:.2f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_path", required=True)
    parser.add_argument("--settings", default="a,b,c")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    env = gpu_environment("gpu_check")
    rows = [run_setting(s, Path(args.data_path).resolve()) for s in args.settings.split(",")]
    write_json(args.json, {"environment": env, "rows": rows})
    print(json.dumps(env))
    print(markdown(rows))


if __name__ == "__main__":
    main()
