"""Write configs/reference/openood-v1.5.csv from OpenOOD v1.5's published leaderboard files.

Input: a folder holding the leaderboard repository's ``results/<benchmark>.csv`` files
(GitHub ``zjysteven/OpenOOD``, branch ``leaderboard``, last commit 2025-07-19), e.g. the
project's ``../shared/reference/openood-v1.5``. Output: one ledger row per benchmark, method,
training, architecture and metric (`oodbench.report.ledger` documents the columns). Nothing
reads the input at run time: run this once when the leaderboard changes and commit the CSV.

    python tools/openood_ledger.py ../shared/reference/openood-v1.5 > configs/reference/openood-v1.5.csv

The published values are copied as text ("88.03 ± 0.25" -> value 88.03, std 0.25; "/" -> no
row); only the benchmark and method names are translated (`BENCHMARKS`, `METHODS`: OpenOOD's
postprocessor name -> the oodbench registry name; names oodbench does not register stay as
published).
"""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path

SOURCE = "https://github.com/zjysteven/OpenOOD/blob/leaderboard/results/{file}"
DATE = "2025-07-19"  # the leaderboard branch's last commit
TABLE = "leaderboard"
BENCHMARKS = {"cifar10": "cifar10", "cifar100": "cifar100", "imagenet200_ood": "imagenet200",
              "imagenet200_fsood": "imagenet200_fs", "imagenet1k_ood": "imagenet", "imagenet1k_fsood": "imagenet_fs"}
METHODS = {"OpenMax": "openmax", "MSP": "msp", "TempScale": "temp_scaling", "ODIN": "odin", "MDS": "mds",
           "MDSEns": "mds_ensemble", "RMDS": "rmds", "Gram": "gram", "EBO": "ebo", "GradNorm": "gradnorm",
           "ReAct": "react", "MLS": "mls", "KLM": "klm", "VIM": "vim", "KNN": "knn", "DICE": "dice",
           "RankFeat": "rankfeat", "ASH": "ash", "SHE": "she", "GEN": "gen", "Relation": "relation",
           "SCALE": "scale", "fDBD": "fdbd", "i-ODIN": "iodin", "AdaSCALE-A": "adascale_a",
           "AdaSCALE-L": "adascale_l", "NCI": "nci", "NNGuide": "nnguide", "MDS++": "mds_pp", "RMDS++": "rmds_pp",
           "WeiPer+KLD": "weiper_kld", "NAC": "nac", "OTOD": "otod"}
METRICS = {"Near-OOD_AUROC": "near_auroc", "Far-OOD_AUROC": "far_auroc", "ID_Accuracy": "acc"}
COLUMNS = ["benchmark", "method", "published_method", "training", "architecture", "description", "outlier_data",
           "metric", "value", "std", "fpr_convention", "conventions", "source", "table", "date"]
PUBLISHED = re.compile(r"^\s*(?P<value>\d+(?:\.\d+)?)\s*(?:±\s*(?P<std>\d+(?:\.\d+)?))?\s*$")


def convert(folder: Path) -> list[dict[str, str]]:
    rows = []
    for file, benchmark in BENCHMARKS.items():
        with open(folder / f"{file}.csv", newline="") as handle:
            for entry in csv.DictReader(handle):
                for column, metric in METRICS.items():
                    text = entry[column].strip()
                    if text in ("/", "", "-"):
                        continue
                    match = PUBLISHED.match(text)
                    if match is None:
                        raise SystemExit(f"{file}.csv: cannot read {column} {text!r}")
                    rows.append({
                        "benchmark": benchmark, "method": METHODS.get(entry["Postprocessor"], entry["Postprocessor"]),
                        "published_method": entry["Postprocessor"], "training": entry["Training"],
                        "architecture": entry["Arch"], "description": entry["Additional_Description"],
                        "outlier_data": entry["Outlier_Data"].lower(), "metric": metric,
                        "value": match["value"], "std": match["std"] or "", "fpr_convention": "",
                        "conventions": "openood", "source": SOURCE.format(file=f"{file}.csv"), "table": TABLE,
                        "date": DATE})
    return rows


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.split("\n\n")[2], file=sys.stderr)
        return 2
    writer = csv.DictWriter(sys.stdout, COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(convert(Path(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
