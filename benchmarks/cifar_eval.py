"""Issue-4 figures: prompt-engineering ablation, linear probe, few-shot curve and coco-mini retrieval for the
checkpoints trained by benchmarks/cifar_zeroshot.py (one per seed), all through the `clipforge eval` CLI.

    python benchmarks/cifar_eval.py --runs runs/bench --json runs/bench/eval.json
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from clipforge import cli

REPO = Path(__file__).resolve().parents[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "bench")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    cifar, coco = str(args.data / "cifar10"), str(args.data / "coco-mini")
    results = {}
    for seed in args.seeds:
        ckpt = str(args.runs / f"clipforge-seed{seed}" / "checkpoints" / "step-00000400")
        out = args.runs / f"eval-seed{seed}"
        out.mkdir(parents=True, exist_ok=True)
        row = {}
        for label, templates in (("bare_names", "none"), ("a_photo_of", "a photo of a {}."), ("ensemble_18", None)):
            extra = ["--templates", templates] if templates else []
            cli.main(["eval", "zeroshot", "--pretrained", ckpt, "--dataset-root", cifar, "--quiet",
                      "--output", str(out / f"zs-{label}.json"), *extra])
            row[f"zeroshot_{label}"] = json.loads((out / f"zs-{label}.json").read_text())["metrics"]["acc1"]
        cli.main(["eval", "linear-probe", "--pretrained", ckpt, "--dataset-root", cifar, "--quiet",
                  "--output", str(out / "lp.json")])
        row["linear_probe"] = json.loads((out / "lp.json").read_text())["metrics"]["lp_acc1"]
        cli.main(["eval", "fewshot", "--pretrained", ckpt, "--dataset-root", cifar, "--quiet",
                  "--output", str(out / "fs.json"), "--plot", str(out / "fewshot.png")])
        row["fewshot"] = json.loads((out / "fs.json").read_text())["curve"]
        cli.main(["eval", "retrieval", "--pretrained", ckpt, "--dataset-root", coco, "--quiet",
                  "--output", str(out / "coco.json")])
        row["coco_mini"] = json.loads((out / "coco.json").read_text())["metrics"]
        results[seed] = row
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    for key in ("zeroshot_bare_names", "zeroshot_a_photo_of", "zeroshot_ensemble_18", "linear_probe"):
        values = [r[key] for r in results.values()]
        print(f"{key:22s} median {statistics.median(values):.4f}  {values}")


if __name__ == "__main__":
    main()
