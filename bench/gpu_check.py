"""TiM4Rec's Triton path against its PyTorch path on one GPU, at the three settings of the paper.

For each setting: one real training batch of the dataset, one set of weights, and
- the errors of the Triton path (float32) and of the PyTorch path (float32), each against the
  PyTorch path in float64: loss, full-sort scores and every parameter's gradient (relative norms);
- the first training step of each path (Triton: includes compiling and autotuning the kernels), the
  median step over 20 after warm-up (forward, backward, Adam), and the peak GPU memory;
- RecBole's SASRec (2 layers, 2 heads, same width, CE) on the same batch, as the step-time yardstick.

    python bench/gpu_check.py --data_path=DIR [--settings a,b,c] [--json OUT.json]

DIR holds amazon-sports/ and ml-1m-half/ (the shared atomic files). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTINGS = {  # name: (config file, dataset)
    "a": ("config4beauty_64d.yaml", "amazon-sports"),
    "b": ("config4movie_64d.yaml", "ml-1m-half"),
    "c": ("config4movie_256d.yaml", "ml-1m-half"),
}


def first_batch(config):
    from recbole.data import create_dataset, data_preparation

    dataset = create_dataset(config)
    train_data, _, _ = data_preparation(config, dataset)
    return train_data.dataset, next(iter(train_data))


def make_model(model_class, config, dataset, **overrides):
    import torch

    config = copy.deepcopy(config)
    for key, value in overrides.items():
        config[key] = value
    torch.manual_seed(0)
    return model_class(config, dataset)


def rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def loss_scores_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model.calculate_loss(batch)
    loss.backward()
    with __import__("torch").no_grad():
        scores = model.full_sort_predict(batch)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), scores, grads


def parity(model_class, config, dataset, batch, state):
    """Errors of each float32 path against the float64 PyTorch path (dropout off)."""
    import torch

    ref = make_model(model_class, config, dataset, ssd_backend="torch").double().cuda().eval()
    ref.load_state_dict(state)
    r_loss, r_scores, r_grads = loss_scores_grads(ref, batch)
    out = {}
    for backend in ("triton", "torch"):
        model = make_model(model_class, config, dataset, ssd_backend=backend).cuda().eval()
        model.load_state_dict(state)
        loss, scores, grads = loss_scores_grads(model, batch)
        grad_errors = {n: rel(grads[n], r_grads[n]) for n in r_grads}
        worst = max(grad_errors, key=grad_errors.get)
        out[backend] = {
            "loss": abs(loss.item() - r_loss.item()) / abs(r_loss.item()),
            "scores": rel(scores, r_scores),
            "grads_max": grad_errors[worst],
            "grads_max_param": worst,
            "grads_median": statistics.median(grad_errors.values()),
        }
        del model
        torch.cuda.empty_cache()
    return out


def time_steps(model, batch):
    """First step (s), median step (ms) and peak memory (GB) of fwd + bwd + Adam, in train mode."""
    from gpu_speed import time_steps as eager_steps  # the benchmark beside this one

    row = eager_steps(model, batch, graph=False, anomaly=False)
    return row["first_s"], row["step_ms"], row["peak_gb"]


def run_setting(name, data_path):
    import torch
    from recbole.model.sequential_recommender import SASRec

    from pipeline.settings import CONFIG_DIR, build_config

    config_file, dataset_name = SETTINGS[name]
    config, spec = build_config(None, [CONFIG_DIR / config_file],
                                {"dataset": dataset_name, "data_path": data_path,
                                 "show_progress": False})
    dataset, batch = first_batch(config)
    batch = batch.to("cuda")
    base = make_model(spec.model_class, config, dataset, ssd_backend="torch")
    state = {k: v.cuda() for k, v in base.state_dict().items()}
    row = {"setting": name, "config": config_file, "dataset": dataset_name,
           "batch": len(batch[config["ITEM_LIST_LENGTH_FIELD"]]),
           "length": config["MAX_ITEM_LIST_LENGTH"], "hidden": config["hidden_size"]}

    # Timed first: the Triton path's first step then includes this process's compile and autotune.
    for backend in ("triton", "torch"):
        model = make_model(spec.model_class, config, dataset, ssd_backend=backend).cuda()
        model.load_state_dict(state)
        row[backend] = dict(zip(("first_s", "step_ms", "peak_gb"), time_steps(model, batch)))
        del model
        torch.cuda.empty_cache()

    sas_config = copy.deepcopy(config)
    for key, value in dict(n_layers=2, n_heads=2, inner_size=4 * config["hidden_size"],
                           hidden_dropout_prob=0.2, attn_dropout_prob=0.2, hidden_act="gelu",
                           layer_norm_eps=1e-12, initializer_range=0.02, loss_type="CE").items():
        sas_config[key] = value
    torch.manual_seed(0)
    sasrec = SASRec(sas_config, dataset).cuda()
    row["SASRec"] = dict(zip(("first_s", "step_ms", "peak_gb"), time_steps(sasrec, batch)))
    del sasrec
    row["errors"] = parity(spec.model_class, config, dataset, batch, state)
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

    from pipeline import compat

    compat.apply()
    import torch

    from pipeline.runlog import environment

    if not torch.cuda.is_available():
        sys.exit("gpu_check: needs a CUDA device")
    env = environment("cuda")
    rows = [run_setting(s, str(Path(args.data_path).resolve())) for s in args.settings.split(",")]
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "rows": rows}, indent=2))
    print(json.dumps(env))
    print(markdown(rows))


if __name__ == "__main__":
    main()
