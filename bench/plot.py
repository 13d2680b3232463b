"""Plot the seed's table and the throughput workload from bench/throughput.py's markdown.

    python bench/plot.py bench/h200/throughput-llama-1b.md -o bench/h200/throughput-llama-1b.png
"""

import argparse
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def table_rows(text: str, heading: str) -> list[list[str]]:
    """Cells of the markdown table that follows the line starting with `heading`."""
    lines = text[text.index(heading):].splitlines()[1:]
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows[2:]  # past the header and the separator


def number(cell: str) -> float:
    return float(re.sub(r"[^0-9.]", "", cell))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("table", type=Path)
    parser.add_argument("-o", "--out", type=Path, required=True)
    args = parser.parse_args()
    text = args.table.read_text()
    seed = table_rows(text, "**(a)")
    work = table_rows(text, "**(b)")
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    batches = [int(r[0]) for r in seed]
    left.plot(batches, [number(r[1]) for r in seed], "o-", label="pagedq")
    left.plot(batches, [number(r[2]) for r in seed], "s-", label="transformers")
    left.set(xlabel="batch size (x 128 new tokens)", ylabel="seconds", xscale="log",
             xticks=batches, xticklabels=[str(b) for b in batches], title="one batch")
    left.minorticks_off()
    left.legend()
    right.bar([r[0].split(" (")[0] for r in work], [number(r[2]) for r in work])
    right.set(ylabel="output tokens/s", title="256-request workload")
    fig.suptitle(text.splitlines()[0].removeprefix("- machine: "))
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)


if __name__ == "__main__":
    main()
